-- Idempotent: a draft already present (same campaign and client) is not inserted again.
-- Returns the drafts that are new, which are the ones to publish.
INSERT INTO public.subscribers_feedback (
    restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
    adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
    datetime_created, client_id, trigger_datetime_created
)
SELECT restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
       adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
       datetime_created, client_id, trigger_datetime_created
FROM campaign_runner_feedback_stage
ON CONFLICT (adv_campaign_id, client_id) DO NOTHING
RETURNING adv_campaign_id, client_id
