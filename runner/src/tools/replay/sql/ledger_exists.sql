SELECT to_regclass('campaign_replay_ledger') IS NOT NULL
