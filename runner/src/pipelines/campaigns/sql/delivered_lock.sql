-- The clients the given campaigns have reached, locked until the unit's transaction ends (in
-- campaign-id order, as every unit locks them).
SELECT adv_campaign_id, clients FROM public.campaign_runner_delivered
WHERE adv_campaign_id = ANY($1::text[])
ORDER BY adv_campaign_id
FOR UPDATE
