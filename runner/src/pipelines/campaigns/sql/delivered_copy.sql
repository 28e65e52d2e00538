-- The first delivery of campaigns: refused whole (unique violation) when one has a row already.
COPY public.campaign_runner_delivered (adv_campaign_id, clients) FROM STDIN (FORMAT binary)
