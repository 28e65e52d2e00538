-- Duplicate (adv_campaign_id, client_id) pairs that prevent the idempotency key.
SELECT adv_campaign_id, client_id, count(*) AS copies, array_agg(id ORDER BY id) AS ids
FROM public.subscribers_feedback
GROUP BY adv_campaign_id, client_id
HAVING count(*) > 1
ORDER BY copies DESC
LIMIT 20
