SELECT restaurant_id, client_id FROM public.subscribers_restaurants
