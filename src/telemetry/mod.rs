//! Telemetry: Prometheus metrics for `GET /metrics`. Records nothing by itself; the chat
//! handler hands it each request's final ledger row.

pub mod metrics;

pub use metrics::Metrics;
