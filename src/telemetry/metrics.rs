//! Prometheus metrics (`GET /metrics`, OpenMetrics text): per-request counters and
//! histograms fed from each request's final ledger [`Record`], plus the ledger writer's
//! own counters read at scrape time. Only what is really measured is exposed.
//!
//! Hook for other subsystems (the local model's queue depth, the classifier cache's hit
//! rate): register their metrics or a [`Collector`] through [`Metrics::registry_mut`]
//! while the gateway starts, before the `Metrics` is shared.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::ledger::{Ledger, Record};
use crate::report::UNROUTED;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request seconds: 5 ms to ~80 s, doubling. Local answers and slow reasoning answers both
/// land in informative buckets.
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.005, 2.0, 15,
    ))
}

/// Gateway overhead seconds: 50 µs to ~100 ms, doubling; it should stay at the bottom.
fn overhead_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 12,
    ))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tier: String,
    rule: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tier: String,
    rule: String,
    outcome: String,
    /// `input` (prompt) or `output` (completion), as OpenTelemetry's `gen_ai.token.type`.
    token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    tier: String,
    /// [`crate::error::Error::retry_reason`]: `connect`, `429` or `5xx`.
    reason: &'static str,
}

type CostCounter = Counter<f64, AtomicU64>;

/// The gateway's metrics registry and the handles `observe` updates.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<RequestLabels, CostCounter>,
    baseline_cost: Family<RequestLabels, CostCounter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    ttft: Family<TierLabels, Histogram, fn() -> Histogram>,
    overhead: Family<TierLabels, Histogram, fn() -> Histogram>,
    fallbacks: Family<TierLabels, Counter>,
    escalations: Family<TierLabels, Counter>,
    tokens_estimated: Family<TierLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
}

impl Metrics {
    /// A registry with the request metrics and, when given, the ledger writer's.
    pub fn new(ledger: Option<Ledger>) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "tiergate_requests",
            "Requests by tier that answered, policy rule and outcome (`ok` or the error code)",
            requests.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tiergate_tokens",
            "Tokens by tier, rule, outcome and token_type (input = prompt, output = completion)",
            tokens.clone(),
        );
        let cost = Family::<RequestLabels, CostCounter>::default();
        registry.register_with_unit(
            "tiergate_cost",
            "What requests cost on the tier that answered (all attempts)",
            Unit::Other("usd".into()),
            cost.clone(),
        );
        let baseline_cost = Family::<RequestLabels, CostCounter>::default();
        registry.register_with_unit(
            "tiergate_baseline_cost",
            "What the same requests would have cost on the baseline cloud model",
            Unit::Other("usd".into()),
            baseline_cost.clone(),
        );
        let duration: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_buckets);
        registry.register_with_unit(
            "tiergate_request_duration",
            "Total request latency, from arrival to the last byte",
            Unit::Seconds,
            duration.clone(),
        );
        let ttft: Family<TierLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency_buckets);
        registry.register_with_unit(
            "tiergate_time_to_first_token",
            "Time to first token of successful requests",
            Unit::Seconds,
            ttft.clone(),
        );
        let overhead: Family<TierLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(overhead_buckets);
        registry.register_with_unit(
            "tiergate_gateway_overhead",
            "Time the gateway spent before calling the tier (parsing, scoring, policy)",
            Unit::Seconds,
            overhead.clone(),
        );
        let fallbacks = Family::<TierLabels, Counter>::default();
        registry.register(
            "tiergate_fallbacks",
            "Requests answered by another tier after the first failed or was saturated",
            fallbacks.clone(),
        );
        let escalations = Family::<TierLabels, Counter>::default();
        registry.register(
            "tiergate_escalations",
            "Requests re-asked on a stronger tier after a weak first answer",
            escalations.clone(),
        );
        let tokens_estimated = Family::<TierLabels, Counter>::default();
        registry.register(
            "tiergate_tokens_estimated_requests",
            "Requests whose token counts are the gateway's estimate (no upstream usage)",
            tokens_estimated.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "tiergate_upstream_retries",
            "Calls to a tier asked again after a retryable failure, by tier and reason (connect, 429, 5xx)",
            retries.clone(),
        );
        if let Some(l) = ledger {
            registry.register_collector(Box::new(LedgerCollector(l)));
        }
        Metrics {
            registry,
            requests,
            tokens,
            cost,
            baseline_cost,
            duration,
            ttft,
            overhead,
            fallbacks,
            escalations,
            tokens_estimated,
            retries,
        }
    }

    /// For subsystems that bring their own metrics; see the module documentation.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts one finished request. Called once per request, with the row the ledger gets.
    pub fn observe(&self, r: &Record) {
        let tier = r.tier.clone().unwrap_or_else(|| UNROUTED.to_owned());
        let labels = RequestLabels {
            tier: tier.clone(),
            rule: r.rule.clone().unwrap_or_else(|| "(none)".to_owned()),
            outcome: r.outcome.clone(),
        };
        self.requests.get_or_create(&labels).inc();
        for (kind, n) in [("input", r.prompt_tokens), ("output", r.completion_tokens)] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        tier: labels.tier.clone(),
                        rule: labels.rule.clone(),
                        outcome: labels.outcome.clone(),
                        token_type: kind,
                    })
                    .inc_by(n);
            }
        }
        self.cost.get_or_create(&labels).inc_by(r.cost_usd);
        self.baseline_cost.get_or_create(&labels).inc_by(r.baseline_cost_usd);
        self.duration.get_or_create(&labels).observe(r.latency_ms / 1000.0);
        let by_tier = TierLabels { tier };
        if r.outcome == "ok"
            && let Some(t) = r.ttft_ms
        {
            self.ttft.get_or_create(&by_tier).observe(t / 1000.0);
        }
        // Rejected requests never reach a tier; their `gateway_ms` is the whole request.
        if r.tier.is_some() {
            self.overhead.get_or_create(&by_tier).observe(r.gateway_ms / 1000.0);
        }
        if r.fallback {
            self.fallbacks.get_or_create(&by_tier).inc();
        }
        if r.escalated {
            self.escalations.get_or_create(&by_tier).inc();
        }
        if r.tokens_estimated {
            self.tokens_estimated.get_or_create(&by_tier).inc();
        }
    }

    /// Counts one retry of `tier` after `e`, when the retry policy asks again. Counted as it
    /// happens, not from the row: a request may retry and still fail, or never finish.
    pub fn retried(&self, tier: &str, e: &crate::error::Error) {
        if let Some(reason) = e.retry_reason() {
            self.retries
                .get_or_create(&RetryLabels {
                    tier: tier.to_owned(),
                    reason,
                })
                .inc();
        }
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a metric's own formatting can fail; say so in the output, not silently.
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// The ledger writer's counters, read when scraped so they are always current.
struct LedgerCollector(Ledger);

impl std::fmt::Debug for LedgerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerCollector").finish_non_exhaustive()
    }
}

impl Collector for LedgerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let l = &self.0;
        let dropped = ConstCounter::new(l.dropped());
        dropped.encode(encoder.encode_descriptor(
            "tiergate_ledger_rows_dropped",
            "Ledger rows lost: queue full, writer stopped or a failed batch",
            None,
            dropped.metric_type(),
        )?)?;
        let written = ConstCounter::new(l.written());
        written.encode(encoder.encode_descriptor(
            "tiergate_ledger_rows_written",
            "Ledger rows committed to SQLite",
            None,
            written.metric_type(),
        )?)?;
        let queued = ConstGauge::new(i64::try_from(l.queued()).unwrap_or(i64::MAX));
        queued.encode(encoder.encode_descriptor(
            "tiergate_ledger_queue_depth",
            "Ledger rows waiting for the writer",
            None,
            queued.metric_type(),
        )?)?;
        let alive = ConstGauge::new(i64::from(l.is_alive()));
        alive.encode(encoder.encode_descriptor(
            "tiergate_ledger_writer_up",
            "1 while the ledger writer thread runs",
            None,
            alive.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
