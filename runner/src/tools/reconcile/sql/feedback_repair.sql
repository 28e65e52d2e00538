-- Rows missing in PostgreSQL, from their drafts in Kafka. Idempotent, and safe while the
-- pipeline runs: a pair that is there already (the unique index the runner creates,
-- subscribers_feedback_campaign_client_key) is left as it is.
INSERT INTO public.subscribers_feedback (
    restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
    adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
    client_id, datetime_created, trigger_datetime_created
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],
    $8::text[], $9::int8[], $10::int4[]
)
ON CONFLICT (adv_campaign_id, client_id) DO NOTHING
