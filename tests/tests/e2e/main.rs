//! End-to-end scenarios against real PostgreSQL and the Kafka protocol (librdkafka's mock
//! cluster, in-process). One binary; every test has its own topics and database.

mod cache;
mod contract_upgrade;
mod dead_letters;
mod delivery;
mod deploy;
mod fuzz;
mod header_names;
mod hot_swap;
mod operator;
mod outbox_limits;
mod pipeline;
mod produce;
mod produce_campaigns;
mod reached;
mod reconcile;
mod replay;
mod restart;
mod rules_workflow;
mod sandbox;
mod schedule;
mod schema;
mod secrets;
mod sink_failures;
mod startup;
mod windows;
