-- The rows of the given (campaign, client) pairs ($1 campaigns, $2 clients, element by element).
SELECT f.id, f.restaurant_id, f.adv_campaign_id, f.adv_campaign_content, f.adv_campaign_owner,
       f.adv_campaign_owner_contact, f.adv_campaign_datetime_start, f.adv_campaign_datetime_end,
       f.client_id, f.datetime_created, f.trigger_datetime_created
FROM unnest($1::text[], $2::text[]) AS p (adv_campaign_id, client_id)
JOIN public.subscribers_feedback f
  ON f.adv_campaign_id = p.adv_campaign_id AND f.client_id = p.client_id
