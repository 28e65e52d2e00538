//! Delivery against real Apache Kafka brokers (scripts/kafka.sh: Apache Kafka 4.x, KRaft,
//! on-disk storage) with real runner processes, one binary for both pipelines: `campaigns`
//! and `windows` (store revenue), `startup` (SASL credentials refused, a missing topic);
//! `brokers` starts and stops the brokers. Each test runs alone
//! (the brokers are JVMs and the machine has two cores).

mod brokers;
mod campaigns;
mod produce_campaigns;
mod reconcile;
mod replay;
mod schedule;
mod startup;
mod windows;
