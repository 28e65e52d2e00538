-- The input partitions this runner owns (its fence claims).
SELECT partition FROM public.campaign_runner_fences WHERE topic = $1 AND owner = $2
