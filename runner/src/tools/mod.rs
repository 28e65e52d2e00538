//! Operator commands beyond running the pipelines: the rules workflow (`runner rules new`,
//! `build`, `test`), re-driving dead letters (`runner dead-letters replay`) and comparing the two
//! sinks (`runner reconcile`).

pub mod reconcile;
pub mod replay;
pub mod rules;
