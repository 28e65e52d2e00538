//! The store-revenue pipeline (docs/SPEC.md, "Pipeline 2"): its contract with the sales rules
//! component (`wit/sales/sales-rules.wit`).

pub mod contract;
