-- Makes final the open windows that end at or before the topic's watermark ($1), at most $2
-- of them. Windows another runner is making final at the same time are left to it.
WITH due AS (
    SELECT store, window_start FROM public.store_revenue_windows
    WHERE NOT final AND window_end <= to_timestamp($1::int8)
    ORDER BY store, window_start
    LIMIT $2::int8
    FOR UPDATE SKIP LOCKED
)
UPDATE public.store_revenue_windows w SET final = true, updated_at = now()
FROM due WHERE w.store = due.store AND w.window_start = due.window_start
RETURNING w.store, extract(epoch FROM w.window_start)::int8, w.total_minor, w.events
