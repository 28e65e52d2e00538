-- The input topic's partitions known here ($2: the topic has this many), how many have a
-- watermark, and the least of them.
SELECT count(*)::int8, count(watermark)::int8, min(watermark)
FROM public.store_revenue_partitions
WHERE topic = $1 AND partition < $2
