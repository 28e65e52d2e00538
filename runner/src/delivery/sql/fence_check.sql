-- The partition's current epoch, its row locked until the unit's transaction ends. The row is
-- marked with the attempt's token: an attempt whose COMMIT got no answer (the connection broke)
-- reads it back to learn whether it committed.
UPDATE public.{prefix}_fences SET last_commit = $3 WHERE topic = $1 AND partition = $2
RETURNING epoch
