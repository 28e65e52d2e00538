SELECT outcome, coalesce(reason, ''), count(*)::int8, coalesce(sum(drafts), 0)::int8
FROM campaign_replay_ledger
WHERE run_id = $1
GROUP BY outcome, reason
ORDER BY outcome, reason
