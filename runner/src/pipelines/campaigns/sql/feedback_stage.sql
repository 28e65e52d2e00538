-- A transaction-local staging table: the batch is COPYed here, then inserted idempotently.
CREATE TEMP TABLE IF NOT EXISTS campaign_runner_feedback_stage
    (LIKE public.subscribers_feedback INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
