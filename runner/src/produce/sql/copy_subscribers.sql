-- Generated subscriptions, written with binary COPY (client_id, restaurant_id: varchar).
COPY public.subscribers_restaurants (client_id, restaurant_id) FROM STDIN (FORMAT binary)
