-- Campaigns of the given partitions waiting for their start, and the earliest start.
SELECT count(*), min(opens)
FROM public.campaign_runner_registry
WHERE topic = $1 AND partition = ANY($2::int4[]) AND NOT started
