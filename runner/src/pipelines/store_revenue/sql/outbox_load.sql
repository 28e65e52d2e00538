-- A partition's outbox entries after id $3, oldest first, at most $4.
SELECT id, target, key, value, headers FROM public.store_revenue_outbox
WHERE topic = $1 AND partition = $2 AND id > $3
ORDER BY id
LIMIT $4
