-- The runner's delivery protocol objects (README, "Delivery guarantees"). SPEC.md's tables
-- keep their columns; subscribers_feedback gets a unique index (the idempotency key).

-- One row per (campaign, client): a replayed batch inserts nothing twice.
CREATE UNIQUE INDEX IF NOT EXISTS subscribers_feedback_campaign_client_key
    ON public.subscribers_feedback (adv_campaign_id, client_id);

-- What was committed to PostgreSQL and must reach Kafka: one row per source message, deleted
-- once the Kafka transaction that published it (and committed its offset) has committed.
CREATE TABLE IF NOT EXISTS public.campaign_runner_outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    partition int4 NOT NULL,
    source_offset int8 NOT NULL,
    -- 'drafts' (one record per element of keys/payloads, or per client in `drafts`) or
    -- 'dead_letters' (one record).
    target text NOT NULL,
    keys bytea[] NOT NULL,
    payloads bytea[] NOT NULL,
    -- A campaign's drafts as their template: the client ids, the parts every draft shares and
    -- each client's fills (runner/src/rules/drafts.rs, Drafts::encode); keys and payloads are
    -- then empty. NULL when the records are in keys and payloads.
    drafts bytea,
    -- The records' headers, encoded (runner/src/sink/feedback.rs, encode_headers).
    headers bytea NOT NULL
);
-- Outboxes made before `drafts` existed.
ALTER TABLE public.campaign_runner_outbox ADD COLUMN IF NOT EXISTS drafts bytea;
CREATE INDEX IF NOT EXISTS campaign_runner_outbox_partition
    ON public.campaign_runner_outbox (topic, partition, source_offset);

-- Who owns an input partition: a writer holding an older epoch is a zombie and is refused.
CREATE TABLE IF NOT EXISTS public.campaign_runner_fences (
    topic text NOT NULL,
    partition int4 NOT NULL,
    epoch int8 NOT NULL,
    owner text NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Outbox payloads are short-lived and very alike (one campaign's drafts): lz4 compresses them
-- several times faster than the default pglz, which the fan-out benchmark showed as a cost.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'public.campaign_runner_outbox'::regclass
                 AND attname = 'payloads' AND attcompression <> 'l') THEN
        ALTER TABLE public.campaign_runner_outbox ALTER COLUMN payloads SET COMPRESSION lz4;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'public.campaign_runner_outbox'::regclass
                 AND attname = 'drafts' AND attcompression <> 'l') THEN
        ALTER TABLE public.campaign_runner_outbox ALTER COLUMN drafts SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available here; the outbox keeps the default compression';
END $$;
