INSERT INTO campaign_replay_ledger (dead_letter_topic, dead_letter_partition, dead_letter_offset,
                                    outcome, reason, drafts, rules_version, rules_sha256, run_id)
SELECT $1, $2, u.o, u.outcome, u.reason, u.drafts, $3, $4, $5
FROM unnest($6::int8[], $7::text[], $8::text[], $9::int4[]) AS u(o, outcome, reason, drafts)
ON CONFLICT (dead_letter_topic, dead_letter_partition, dead_letter_offset) DO NOTHING
RETURNING dead_letter_offset
