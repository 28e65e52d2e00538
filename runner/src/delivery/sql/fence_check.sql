-- The partition's current epoch, locked until the unit's transaction ends.
SELECT epoch FROM public.{prefix}_fences WHERE topic = $1 AND partition = $2 FOR UPDATE
