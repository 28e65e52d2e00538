-- Rows missing in PostgreSQL, from their drafts in Kafka. Idempotent, and safe while the
-- pipeline runs: a pair that is in the table already is left as it is; the pairs inserted are
-- added to what their campaign has reached (campaign_runner_delivered, locked meanwhile as the
-- runner locks it), so that the runner never delivers them again.
WITH given AS (
    SELECT DISTINCT ON (adv_campaign_id, client_id) *
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],
        $8::text[], $9::int8[], $10::int4[]
    ) AS u (restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
            adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
            client_id, datetime_created, trigger_datetime_created)
),
locked AS (
    SELECT adv_campaign_id FROM public.campaign_runner_delivered
    WHERE adv_campaign_id IN (SELECT adv_campaign_id FROM given)
    ORDER BY adv_campaign_id
    FOR UPDATE
),
inserted AS (
    INSERT INTO public.subscribers_feedback (
        restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
        adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
        client_id, datetime_created, trigger_datetime_created
    )
    SELECT g.* FROM given g
    -- (reads `locked` first: the campaigns' rows are locked before anything is inserted)
    WHERE (SELECT count(*) FROM locked) >= 0
      AND NOT EXISTS (SELECT 1 FROM public.subscribers_feedback f
                      WHERE f.adv_campaign_id = g.adv_campaign_id AND f.client_id = g.client_id)
    RETURNING adv_campaign_id, client_id
),
noted AS (
    INSERT INTO public.campaign_runner_delivered AS d (adv_campaign_id, clients)
    SELECT adv_campaign_id, array_agg(client_id) FROM inserted GROUP BY adv_campaign_id
    ON CONFLICT (adv_campaign_id) DO UPDATE
        SET clients = ARRAY(SELECT DISTINCT unnest(d.clients || EXCLUDED.clients))
)
SELECT count(*) FROM inserted
