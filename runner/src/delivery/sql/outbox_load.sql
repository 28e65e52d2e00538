-- A partition's outbox, oldest first.
SELECT source_offset, target, keys, payloads, drafts, headers FROM public.{prefix}_outbox
WHERE topic = $1 AND partition = $2 ORDER BY source_offset, id
