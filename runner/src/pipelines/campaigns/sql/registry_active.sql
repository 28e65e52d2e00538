-- Started campaigns of the given partitions that are active now, for the given restaurants
-- (all restaurants when $4 is NULL).
SELECT adv_campaign_id, restaurant_id, partition, source_offset, message_key, payload, opens, closes
FROM public.campaign_runner_registry
WHERE topic = $1 AND partition = ANY($2::int4[]) AND started AND opens <= $3 AND closes > $3
  AND ($4::text[] IS NULL OR restaurant_id = ANY($4::text[]))
