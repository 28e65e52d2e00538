-- A campaign delivered again reaches more clients.
UPDATE public.campaign_runner_delivered SET clients = clients || $2::text[]
WHERE adv_campaign_id = $1
