-- The columns of one table in public, with their types: checked against what the runner writes.
SELECT column_name, data_type
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = $1
