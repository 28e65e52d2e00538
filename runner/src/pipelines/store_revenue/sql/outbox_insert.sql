INSERT INTO public.store_revenue_outbox (topic, partition, target, key, value, headers)
SELECT $1, $2, o.target, o.key, o.value, o.headers
FROM unnest($3::text[], $4::bytea[], $5::bytea[], $6::bytea[]) AS o(target, key, value, headers)
