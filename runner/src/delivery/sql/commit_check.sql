-- The token of the partition's last committed unit transaction.
SELECT last_commit FROM public.{prefix}_fences WHERE topic = $1 AND partition = $2
