//! End-to-end scenarios against real PostgreSQL and the Kafka protocol (librdkafka's mock
//! cluster, in-process). One binary; every test has its own topics and database.

mod cache;
mod dead_letters;
mod delivery;
mod hot_swap;
mod operator;
mod pipeline;
mod produce;
mod restart;
mod sandbox;
mod schema;
mod sink_failures;
mod windows;
