-- The pipeline's outbox entries for the output topic ({prefix}: the campaign pipeline's table
-- prefix): drafts committed to PostgreSQL whose Kafka transaction may not have committed yet
-- (runner/src/delivery/outbox.rs). `drafts` is the records' template when not NULL, else the
-- records are in keys and payloads.
SELECT keys, payloads, drafts, headers
FROM public.{prefix}_outbox
WHERE target = 'drafts'
