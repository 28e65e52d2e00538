-- The delivery protocol's own tables for one pipeline (README, "Delivery guarantees"); `{prefix}`
-- is the pipeline's table prefix (the campaign pipeline's is `campaign_runner`).

-- What was committed to PostgreSQL and must reach Kafka: one row per source message, deleted
-- once the Kafka transaction that published it (and committed its offset) has committed.
CREATE TABLE IF NOT EXISTS public.{prefix}_outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    partition int4 NOT NULL,
    source_offset int8 NOT NULL,
    -- 'drafts' (the pipeline's output topic: one record per element of keys/payloads, or per
    -- key of `drafts`) or 'dead_letters' (one record).
    target text NOT NULL,
    keys bytea[] NOT NULL,
    payloads bytea[] NOT NULL,
    -- Records that share most of their bytes, as their template: the keys, the parts every
    -- record shares and each record's fills (runner/src/delivery/template.rs,
    -- TemplateRecords::encode); keys and payloads are then empty. NULL when the records are in
    -- keys and payloads.
    drafts bytea,
    -- The records' headers, encoded (runner/src/headers.rs, encode).
    headers bytea NOT NULL
);
-- Outboxes made before `drafts` existed.
ALTER TABLE public.{prefix}_outbox ADD COLUMN IF NOT EXISTS drafts bytea;
CREATE INDEX IF NOT EXISTS {prefix}_outbox_partition
    ON public.{prefix}_outbox (topic, partition, source_offset);

-- Who owns an input partition: a writer holding an older epoch is a zombie and is refused.
CREATE TABLE IF NOT EXISTS public.{prefix}_fences (
    topic text NOT NULL,
    partition int4 NOT NULL,
    epoch int8 NOT NULL,
    owner text NOT NULL,
    PRIMARY KEY (topic, partition)
);
-- The token of the last unit transaction committed for the partition (fence_check.sql).
ALTER TABLE public.{prefix}_fences ADD COLUMN IF NOT EXISTS last_commit text;

-- Outbox payloads are short-lived and very alike (one message's records): lz4 compresses them
-- several times faster than the default pglz, which the fan-out benchmark showed as a cost.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'public.{prefix}_outbox'::regclass
                 AND attname = 'payloads' AND attcompression <> 'l') THEN
        ALTER TABLE public.{prefix}_outbox ALTER COLUMN payloads SET COMPRESSION lz4;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'public.{prefix}_outbox'::regclass
                 AND attname = 'drafts' AND attcompression <> 'l') THEN
        ALTER TABLE public.{prefix}_outbox ALTER COLUMN drafts SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available here; the outbox keeps the default compression';
END $$;
