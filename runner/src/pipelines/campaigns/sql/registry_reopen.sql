-- A start triggered too early (the consuming runner's clock was behind): to be triggered again,
-- unless the campaign was published again since.
UPDATE public.campaign_runner_registry AS r SET started = false, updated_at = now()
FROM UNNEST($1::text[], $2::int4[], $3::int8[]) AS u(adv_campaign_id, partition, source_offset)
WHERE r.adv_campaign_id = u.adv_campaign_id
  AND r.partition = u.partition
  AND r.source_offset = u.source_offset
