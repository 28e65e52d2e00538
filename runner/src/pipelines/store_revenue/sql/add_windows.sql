-- Adds a partition's sums to their windows ($1..$4: store, window start, amount, events, sorted
-- by store and window so that partitions adding to the same windows lock them in one order).
-- $5: window size (s); $6: minor units per currency unit; $7: minor digits.
INSERT INTO public.store_revenue_windows AS w
    (store, window_start, window_end, total_minor, total, total_revenue_int, events, updated_at)
SELECT d.store, to_timestamp(d.ws), to_timestamp(d.ws + $5::int8), d.amount,
       round(d.amount::numeric / $6::int8, $7::int4), d.amount / $6::int8, d.events, now()
FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) AS d(store, ws, amount, events)
ON CONFLICT (store, window_start) DO UPDATE SET
    total_minor = w.total_minor + EXCLUDED.total_minor,
    total = round((w.total_minor + EXCLUDED.total_minor)::numeric / $6::int8, $7::int4),
    total_revenue_int = (w.total_minor + EXCLUDED.total_minor) / $6::int8,
    events = w.events + EXCLUDED.events,
    updated_at = now()
RETURNING store, extract(epoch FROM window_start)::int8, total_minor, events, final
