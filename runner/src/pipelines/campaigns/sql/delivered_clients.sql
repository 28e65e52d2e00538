-- The clients the given campaigns have reached (their drafts are in subscribers_feedback).
SELECT adv_campaign_id, clients FROM public.campaign_runner_delivered
WHERE adv_campaign_id = ANY($1::text[])
