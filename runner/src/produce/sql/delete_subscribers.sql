-- The generator's own restaurants are emptied before they are seeded, so that seeding again
-- with the same seed leaves exactly the same rows. $1: the restaurant ids (text[]).
DELETE FROM public.subscribers_restaurants WHERE restaurant_id = ANY($1)
