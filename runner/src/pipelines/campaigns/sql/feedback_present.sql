-- Which of the given (campaign, client) pairs have their draft already.
SELECT f.adv_campaign_id, f.client_id
FROM public.subscribers_feedback AS f
JOIN UNNEST($1::text[], $2::text[]) AS u(adv_campaign_id, client_id)
  ON f.adv_campaign_id = u.adv_campaign_id AND f.client_id = u.client_id
