COPY public.{prefix}_outbox (topic, partition, source_offset, target, keys, payloads, drafts, headers)
FROM STDIN (FORMAT binary)
