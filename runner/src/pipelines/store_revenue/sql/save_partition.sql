UPDATE public.store_revenue_partitions
SET next_offset = $3, max_event_time = $4, watermark = $5, updated_at = now()
WHERE topic = $1 AND partition = $2
