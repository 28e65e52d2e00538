-- The partition's current epoch and position, locked until the transaction ends.
SELECT epoch, next_offset FROM public.store_revenue_partitions
WHERE topic = $1 AND partition = $2 FOR UPDATE
