-- What each campaign has reached: one row per campaign delivered, with every client that has
-- its draft in subscribers_feedback. Written in the delivery unit's transaction that writes the
-- drafts, so it never disagrees with the table; it is what makes each (campaign, client) draft
-- exactly once (docs/delivery.md, "The protocol"), without an index on SPEC.md's table.
DO $$
BEGIN
    IF to_regclass('public.campaign_runner_delivered') IS NULL THEN
        CREATE TABLE public.campaign_runner_delivered (
            adv_campaign_id text PRIMARY KEY,
            clients text[] NOT NULL
        );
        -- The drafts already in the table (written by an earlier version of the runner, or
        -- before it ran) count as delivered; nobody adds one meanwhile.
        LOCK TABLE public.subscribers_feedback IN SHARE MODE;
        INSERT INTO public.campaign_runner_delivered (adv_campaign_id, clients)
        SELECT adv_campaign_id, array_agg(DISTINCT client_id)
        FROM public.subscribers_feedback
        GROUP BY adv_campaign_id;
    END IF;
    -- The unique (campaign, client) index earlier versions of the runner added to SPEC.md's
    -- table: the table above replaces it, and every row it indexed is in the table above.
    DROP INDEX IF EXISTS public.subscribers_feedback_campaign_client_key;
END $$;

-- A campaign's clients are written once and read only when it is delivered again: lz4 keeps
-- that write cheap where the server has it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'public.campaign_runner_delivered'::regclass
                 AND attname = 'clients' AND attcompression <> 'l') THEN
        ALTER TABLE public.campaign_runner_delivered ALTER COLUMN clients SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available here; campaign_runner_delivered keeps the default compression';
END $$;
