-- The campaign pipeline's registry: one row per campaign that is not over yet, as its latest
-- publication says (docs/delivery.md, "Scheduled starts and new subscribers"). Written in the
-- delivery unit's transaction of the publication; read by the scheduler of the runner that owns
-- the row's input partition; deleted once the campaign's window has closed.
CREATE TABLE IF NOT EXISTS public.campaign_runner_registry (
    adv_campaign_id text PRIMARY KEY,
    restaurant_id text NOT NULL,
    -- Where the latest publication was read: triggers go back to this partition.
    topic text NOT NULL,
    partition int4 NOT NULL,
    source_offset int8 NOT NULL,
    message_key bytea,
    payload bytea NOT NULL,
    -- The rules' window (unix seconds): active from `opens`, over at `closes`.
    opens int8 NOT NULL,
    closes int8 NOT NULL,
    -- The campaign has reached its subscribers of its start: published while active, or its
    -- scheduled start triggered.
    started bool NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS campaign_runner_registry_due
    ON public.campaign_runner_registry (topic, partition, opens) WHERE NOT started;
CREATE INDEX IF NOT EXISTS campaign_runner_registry_restaurant
    ON public.campaign_runner_registry (restaurant_id);
CREATE INDEX IF NOT EXISTS campaign_runner_registry_closes
    ON public.campaign_runner_registry (topic, partition, closes);
