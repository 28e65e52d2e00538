-- The runner's change feed on subscribers_restaurants (its own objects; SPEC.md's columns are
-- untouched). After each statement that changes the table, one NOTIFY on channel
-- campaign_runner_subscriptions says, for every (restaurant_id, client_id) pair the statement
-- touched, whether that subscription exists now: deleting one of two duplicate rows leaves
-- it present. A statement touching more pairs than fit in one notification sends
-- {"resync": true} instead, and the runner reloads the whole table.

-- Lets the presence check find a pair without scanning the table.
CREATE INDEX IF NOT EXISTS subscribers_restaurants_restaurant_client_idx
    ON public.subscribers_restaurants (restaurant_id, client_id);

CREATE OR REPLACE FUNCTION public.campaign_runner_subscriptions_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    pairs jsonb;
    payload text;
BEGIN
    -- Count first: a bulk statement is not aggregated, it asks for a resync.
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO n FROM new_rows;
        IF n <= 40 THEN
            SELECT jsonb_agg(DISTINCT jsonb_build_array(restaurant_id, client_id)) INTO pairs FROM new_rows;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT count(*) INTO n FROM old_rows;
        IF n <= 40 THEN
            SELECT jsonb_agg(DISTINCT jsonb_build_array(restaurant_id, client_id)) INTO pairs FROM old_rows;
        END IF;
    ELSE
        SELECT 2 * count(*) INTO n FROM new_rows;
        IF n <= 40 THEN
            SELECT jsonb_agg(DISTINCT p) INTO pairs FROM (
                SELECT jsonb_build_array(restaurant_id, client_id) AS p FROM new_rows
                UNION ALL
                SELECT jsonb_build_array(restaurant_id, client_id) FROM old_rows) u;
        END IF;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    ELSIF n > 40 THEN
        payload := '{"resync":true}';
    ELSE
        SELECT json_build_object('changes', json_agg(json_build_array(p->>0, p->>1,
                   EXISTS (SELECT 1 FROM public.subscribers_restaurants s
                           WHERE s.restaurant_id = p->>0 AND s.client_id = p->>1))))::text
          INTO payload
          FROM jsonb_array_elements(pairs) p;
        IF octet_length(payload) > 7900 THEN
            payload := '{"resync":true}';
        END IF;
    END IF;
    PERFORM pg_notify('campaign_runner_subscriptions', payload);
    RETURN NULL;
END
$$;


CREATE OR REPLACE TRIGGER campaign_runner_subscriptions_insert
    AFTER INSERT ON public.subscribers_restaurants
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.campaign_runner_subscriptions_changed();


CREATE OR REPLACE TRIGGER campaign_runner_subscriptions_update
    AFTER UPDATE ON public.subscribers_restaurants
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.campaign_runner_subscriptions_changed();


CREATE OR REPLACE TRIGGER campaign_runner_subscriptions_delete
    AFTER DELETE ON public.subscribers_restaurants
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.campaign_runner_subscriptions_changed();

-- TRUNCATE has no transition table: the runner reloads everything.
CREATE OR REPLACE FUNCTION public.campaign_runner_subscriptions_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('campaign_runner_subscriptions', '{"resync":true}');
    RETURN NULL;
END
$$;


CREATE OR REPLACE TRIGGER campaign_runner_subscriptions_truncate
    AFTER TRUNCATE ON public.subscribers_restaurants
    FOR EACH STATEMENT EXECUTE FUNCTION public.campaign_runner_subscriptions_truncated();
