-- A partition's outbox entries a committed Kafka transaction published.
DELETE FROM public.store_revenue_outbox WHERE topic = $1 AND partition = $2 AND id <= $3
