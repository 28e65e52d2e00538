-- Whether the pipeline's outbox exists ({prefix}: the campaign pipeline's table prefix).
SELECT to_regclass('public.{prefix}_outbox') IS NOT NULL
