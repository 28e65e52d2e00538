-- Keeps campaigns (latest publication wins), one row per element of the arrays.
INSERT INTO public.campaign_runner_registry AS r
    (adv_campaign_id, restaurant_id, topic, partition, source_offset, message_key, payload,
     opens, closes, started)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::bytea[],
                     $7::bytea[], $8::int8[], $9::int8[], $10::bool[])
ON CONFLICT (adv_campaign_id) DO UPDATE SET
    restaurant_id = EXCLUDED.restaurant_id,
    topic = EXCLUDED.topic,
    partition = EXCLUDED.partition,
    source_offset = EXCLUDED.source_offset,
    message_key = EXCLUDED.message_key,
    payload = EXCLUDED.payload,
    opens = EXCLUDED.opens,
    closes = EXCLUDED.closes,
    started = EXCLUDED.started,
    updated_at = now()
