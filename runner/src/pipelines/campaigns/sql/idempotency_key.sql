-- One row per (campaign, client): the idempotency key of the feedback table. A replayed unit,
-- or a campaign published twice, inserts nothing twice (README, "Delivery guarantees").
CREATE UNIQUE INDEX IF NOT EXISTS subscribers_feedback_campaign_client_key
    ON public.subscribers_feedback (adv_campaign_id, client_id);
