-- A partition's outbox entries whose Kafka transaction committed.
DELETE FROM public.{prefix}_outbox WHERE topic = $1 AND partition = $2 AND source_offset <= $3
