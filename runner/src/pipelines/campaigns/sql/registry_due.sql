-- Campaigns of the given partitions whose window has opened and whose start was not triggered.
SELECT adv_campaign_id, restaurant_id, partition, source_offset, message_key, payload, opens, closes
FROM public.campaign_runner_registry
WHERE topic = $1 AND partition = ANY($2::int4[]) AND NOT started AND opens <= $3 AND closes > $3
ORDER BY opens
LIMIT $4
