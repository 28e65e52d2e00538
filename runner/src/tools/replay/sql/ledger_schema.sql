-- The dead-letter replay's ledger: one row per dead letter replayed, written in the same
-- transaction as the drafts and the outbox of its unit, so that a dead letter is replayed once.
CREATE TABLE IF NOT EXISTS campaign_replay_ledger (
    dead_letter_topic     text        NOT NULL,
    dead_letter_partition int4        NOT NULL,
    dead_letter_offset    int8        NOT NULL,
    -- delivered, skipped or dead_lettered
    outcome               text        NOT NULL,
    -- the skip reason or the new dead-letter reason
    reason                text,
    drafts                int4        NOT NULL DEFAULT 0,
    rules_version         text        NOT NULL,
    rules_sha256          text        NOT NULL,
    run_id                text        NOT NULL,
    replayed_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dead_letter_topic, dead_letter_partition, dead_letter_offset)
);
