//! A WebAssembly-sandboxed stream transform runner. Campaigns arrive on Kafka; the runner joins
//! each with the restaurant's subscribers held in memory (from PostgreSQL) and writes one
//! notification draft per subscriber to Kafka and to PostgreSQL. The business rules —
//! validation, the "active now" filter, the drafts' shape — live in a WASM component (`wit/`).

pub mod app;
pub mod cache;
pub mod config;
pub mod db;
pub mod demo;
pub mod events;
pub mod pipeline;
pub mod rules;
pub mod sink;
pub mod source;
pub mod status;
