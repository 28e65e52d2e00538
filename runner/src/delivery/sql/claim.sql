-- Takes a partition over: a new epoch fences every earlier owner.
INSERT INTO public.{prefix}_fences (topic, partition, epoch, owner) VALUES ($1, $2, 1, $3)
ON CONFLICT (topic, partition) DO UPDATE
    SET epoch = {prefix}_fences.epoch + 1, owner = EXCLUDED.owner
RETURNING epoch
