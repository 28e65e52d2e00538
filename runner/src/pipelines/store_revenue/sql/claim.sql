-- Takes a partition over: a new epoch fences every earlier owner. A partition seen for the
-- first time starts at $3.
INSERT INTO public.store_revenue_partitions (topic, partition, next_offset, epoch, owner)
VALUES ($1, $2, $3, 1, $4)
ON CONFLICT (topic, partition) DO UPDATE
    SET epoch = store_revenue_partitions.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
RETURNING epoch, next_offset, max_event_time, watermark
