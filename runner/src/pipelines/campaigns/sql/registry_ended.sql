-- Forgets the campaigns of the given partitions whose window has closed; says which never
-- started (no runner was up from their start to their end).
DELETE FROM public.campaign_runner_registry
WHERE topic = $1 AND partition = ANY($2::int4[]) AND closes <= $3
RETURNING adv_campaign_id, partition, source_offset, started
