//! A WebAssembly-sandboxed stream transform runner. One process hosts pipelines; each reads a
//! Kafka topic, runs its business rules in a WASM component (`wit/`, `sandbox/`) and writes its
//! results exactly once to Kafka and PostgreSQL (`delivery/`). The campaign pipeline
//! (`pipelines/campaigns/`) joins each promo campaign with the restaurant's subscribers, held
//! in memory from PostgreSQL, and writes one notification draft per subscriber.
//!
//! The core, shared by every pipeline: `sandbox` (rules hosting, limits, hot swap), `delivery`
//! (units, outbox, fences, Kafka transactions, takeover), `source` (the consumer), `kafka` and
//! `config` (settings), `startup` (what a pipeline needs from outside before it consumes),
//! `events` and `metrics` (what is reported), `status` (HTTP), `retry`,
//! `headers`, `db`, `clock`, `logging` (librdkafka's log lines: levels, secrets redacted,
//! repeats rate-limited). Wiring: `app`; the `runner demo` command: `demo`; the `runner
//! produce` traffic generators: `produce`; the operator commands (rules workflow, dead-letter
//! replay, reconcile): `tools`.

pub mod app;
pub mod clock;
pub mod config;
pub mod db;
pub mod delivery;
pub mod demo;
pub mod events;
pub mod headers;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod pipelines;
pub mod produce;
pub mod retry;
pub mod sandbox;
pub mod source;
pub mod startup;
pub mod status;
pub mod tools;
