//! Telemetry: logging to stderr, request spans exported over OTLP when configured, and
//! Prometheus metrics for `GET /metrics`. Records nothing by itself; the chat handler
//! hands it each request's span and final ledger row.

pub mod metrics;
pub mod trace;

pub use metrics::Metrics;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The process's tracing setup; [`Tracing::shutdown`] flushes spans not yet exported.
#[must_use = "call `shutdown` on exit so the last spans are exported"]
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: log lines on stderr filtered by `TIERGATE_LOG` (tracing
/// `EnvFilter` syntax, default `info,ort=warn`), and, when `otlp_endpoint` is given, an
/// OpenTelemetry layer exporting tiergate's spans there. Call once per process.
pub fn init(otlp_endpoint: Option<&str>) -> anyhow::Result<Tracing> {
    let filter = EnvFilter::try_from_env("TIERGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    // Log lines are events only: the request spans exist for OpenTelemetry, and their
    // attributes would otherwise prefix every line logged inside a request.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter.and(filter_fn(|m| m.is_event())));
    let provider = otlp_endpoint.map(trace::provider).transpose()?;
    let otel = provider.as_ref().map(trace::layer);
    tracing_subscriber::registry().with(logs).with(otel).try_init()?;
    if let Some(e) = otlp_endpoint {
        tracing::info!(endpoint = %trace::traces_url(e), "exporting traces over OTLP/HTTP");
    }
    Ok(Tracing { provider })
}

impl Tracing {
    /// Exports what is still buffered and stops the exporter (off the async workers: the
    /// SDK's shutdown blocks until its export thread is done).
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let done = tokio::task::spawn_blocking(move || p.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
            }
        }
    }
}
