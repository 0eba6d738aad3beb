//! Request tracing: the `tracing` spans of a chat request (request, scoring, policy, tier
//! call) with OpenTelemetry GenAI attributes, and the OTLP/HTTP exporter that ships them
//! when `telemetry.otlp_endpoint` is set. Without an endpoint the spans only give log
//! lines their context; nothing leaves the process.
//!
//! Attribute names follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), plus
//! tiergate's own (`tiergate.*`). Never a prompt, an answer or a key.

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::{BackendConfig, TierConfig};
use crate::ledger::Record;

/// Where OTLP/HTTP sends traces under a collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

/// The span of one chat request, from arrival to the last byte of the answer. Its
/// attributes are filled in by [`record_request`] when the request ends.
pub fn request_span(request_id: &str) -> Span {
    tracing::info_span!(
        "chat",
        otel.name = "chat",
        otel.kind = "server",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.system = Empty,
        gen_ai.request.model = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        "error.type" = Empty,
        http.response.status_code = Empty,
        tiergate.request_id = request_id,
        tiergate.tier = Empty,
        tiergate.rule = Empty,
        tiergate.policy = Empty,
        tiergate.score = Empty,
        tiergate.scorer = Empty,
        tiergate.outcome = Empty,
        tiergate.streamed = Empty,
        tiergate.tokens_estimated = Empty,
        tiergate.gateway_ms = Empty,
        tiergate.cost_usd = Empty,
        tiergate.baseline_cost_usd = Empty,
    )
}

/// Child span of the current request span: scoring the prompt's difficulty.
pub fn score_span(prompt_tokens: u64) -> Span {
    tracing::info_span!(
        "score",
        tiergate.prompt_tokens = i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
        tiergate.score = Empty,
        tiergate.scorer = Empty
    )
}

/// Child span of the current request span: the policy choosing a rule and tier.
pub fn policy_span(policy: &str) -> Span {
    tracing::info_span!(
        "policy",
        tiergate.policy = policy,
        tiergate.rule = Empty,
        tiergate.tier = Empty
    )
}

/// The GenAI "system" of a tier's backend, for `gen_ai.system`.
pub fn system(tier: &TierConfig) -> &'static str {
    match tier.backend {
        BackendConfig::OpenAi { .. } => "openai",
        // In-process ONNX Runtime generation: no GenAI provider, so tiergate's own name.
        BackendConfig::Local(_) => "tiergate.local",
    }
}

/// Child span of the current request span: the call to a tier's backend (a GenAI client
/// span). Also names the request span after the tier's system, which only now is known.
pub fn tier_span(tier: &TierConfig) -> Span {
    let system = system(tier);
    Span::current().record("gen_ai.system", system);
    let name = format!("chat {}", tier.model);
    tracing::info_span!(
        "tier_call",
        otel.name = name.as_str(),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.system = system,
        gen_ai.request.model = tier.model.as_str(),
        tiergate.tier = tier.name.as_str(),
    )
}

/// Fills the request span from the request's final ledger row: what was asked, what
/// answered, tokens, outcome. Called once, where the row is recorded.
pub fn record_request(span: &Span, r: &Record) {
    if let Some(m) = &r.requested_model {
        // GenAI convention: `{operation} {model}`. The model is known only after the body
        // is parsed, when the OpenTelemetry span has already started and the layer no
        // longer applies `otel.name`, so rename it directly.
        span.context().span().update_name(format!("chat {m}"));
        span.record("gen_ai.request.model", m.as_str());
    }
    if let Some(m) = &r.backend_model {
        span.record("gen_ai.response.model", m.as_str());
    }
    // As i64: tracing-opentelemetry exports a u64 as a string, OTLP integers are i64.
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("gen_ai.usage.input_tokens", int(r.prompt_tokens));
    span.record("gen_ai.usage.output_tokens", int(r.completion_tokens));
    span.record("http.response.status_code", i64::from(r.http_status));
    span.record("tiergate.outcome", r.outcome.as_str());
    span.record("tiergate.streamed", r.streamed);
    span.record("tiergate.tokens_estimated", r.tokens_estimated);
    span.record("tiergate.gateway_ms", r.gateway_ms);
    span.record("tiergate.cost_usd", r.cost_usd);
    span.record("tiergate.baseline_cost_usd", r.baseline_cost_usd);
    for (key, v) in [
        ("tiergate.tier", &r.tier),
        ("tiergate.rule", &r.rule),
        ("tiergate.policy", &r.policy),
        ("tiergate.scorer", &r.scorer),
    ] {
        if let Some(v) = v {
            span.record(key, v.as_str());
        }
    }
    if let Some(s) = r.score {
        span.record("tiergate.score", s);
    }
    if r.outcome == "ok" {
        span.record("otel.status_code", "ok");
    } else {
        span.record("otel.status_code", "error");
        span.record("error.type", r.outcome.as_str());
    }
}

/// Records the scorer's verdict on its span.
pub fn scored(span: &Span, score: &crate::routing::Score) {
    span.record("tiergate.score", score.value);
    span.record("tiergate.scorer", score.scorer);
}

/// Records the policy's decision on its span.
pub fn decided(span: &Span, rule: &crate::policy::Rule) {
    span.record("tiergate.rule", rule.name.as_str());
    span.record("tiergate.tier", rule.tier.as_str());
}

/// `http://collector:4318` → `http://collector:4318/v1/traces`; a URL that already ends
/// in `/v1/traces` is kept.
pub fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with(TRACES_PATH) {
        e.to_owned()
    } else {
        format!("{e}{TRACES_PATH}")
    }
}

/// A tracer provider exporting to `endpoint` over OTLP/HTTP (protobuf), in batches from
/// the SDK's own thread, so exporting never runs on the request path.
pub fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("tiergate")
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build())
}

/// The `tracing` layer that turns tiergate's spans into OpenTelemetry spans for `provider`.
/// Only tiergate's own spans (at info and above) are exported, whatever the log filter.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tiergate"))
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("tiergate", tracing::Level::INFO))
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("https://c/otlp/v1/traces"), "https://c/otlp/v1/traces");
    }
}
