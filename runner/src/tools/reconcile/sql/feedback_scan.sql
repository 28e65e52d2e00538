-- Every row of the feedback table (or of the campaigns asked for: $1, NULL for all), streamed.
-- `feedback` is left out: analysts fill it in, the drafts never carry it.
SELECT id, restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
       adv_campaign_owner_contact, adv_campaign_datetime_start, adv_campaign_datetime_end,
       client_id, datetime_created, trigger_datetime_created
FROM public.subscribers_feedback
WHERE $1::text[] IS NULL OR adv_campaign_id = ANY($1::text[])
