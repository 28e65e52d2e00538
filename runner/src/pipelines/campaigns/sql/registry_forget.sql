-- Forgets campaigns whose latest publication says they are over.
DELETE FROM public.campaign_runner_registry WHERE adv_campaign_id = ANY($1::text[])
