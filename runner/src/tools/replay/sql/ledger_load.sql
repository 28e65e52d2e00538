SELECT dead_letter_partition, dead_letter_offset
FROM campaign_replay_ledger
WHERE dead_letter_topic = $1
