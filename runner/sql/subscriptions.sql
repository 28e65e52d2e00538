-- Every subscription, for the in-memory snapshot.
SELECT restaurant_id, client_id FROM public.subscribers_restaurants
