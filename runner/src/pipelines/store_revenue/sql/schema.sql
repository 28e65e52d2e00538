-- The store-revenue pipeline's tables (README, "Store revenue"), created by the runner.

-- Revenue per store and window of event time: what the business reads. Open windows are
-- updated at every trigger; a window is final once every input partition's watermark has
-- passed its end, and then changes no more.
CREATE TABLE IF NOT EXISTS public.store_revenue_windows (
    store text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL,
    -- The exact revenue in minor currency units (cents), and in currency units.
    total_minor int8 NOT NULL,
    total numeric NOT NULL,
    -- The revenue in whole currency units, truncated (the reference's column).
    total_revenue_int int8 NOT NULL,
    events int8 NOT NULL,
    final boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, window_start)
);
CREATE INDEX IF NOT EXISTS store_revenue_windows_open
    ON public.store_revenue_windows (window_end) WHERE NOT final;

-- Each input partition: the first offset not counted yet, its event-time progress, and who owns
-- it (a writer holding an older epoch is a zombie and is refused). Moves in the same
-- transaction as the partition's sums.
CREATE TABLE IF NOT EXISTS public.store_revenue_partitions (
    topic text NOT NULL,
    partition int4 NOT NULL,
    next_offset int8 NOT NULL,
    max_event_time int8,
    watermark int8,
    epoch int8 NOT NULL,
    owner text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- What must reach Kafka (final windows, dead letters), per input partition in the order it was
-- written. A Kafka transaction publishes entries and commits the partition's offset with the
-- greatest id it published as the offset's metadata; entries up to that id are then deleted.
CREATE TABLE IF NOT EXISTS public.store_revenue_outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    partition int4 NOT NULL,
    -- 'output' (the pipeline's output topic) or 'dead_letters'.
    target text NOT NULL,
    key bytea,
    value bytea,
    -- Encoded as runner/src/headers.rs, encode.
    headers bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS store_revenue_outbox_partition
    ON public.store_revenue_outbox (topic, partition, id);
