//! tiergate: an OpenAI-compatible gateway that scores each request's difficulty and sends
//! it to the cheapest tier able to answer it, accounting cost and latency per tier.

pub mod auth;
pub mod cache;
pub mod classifier;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod ledger;
pub mod local;
pub mod onnx;
pub mod openai;
pub mod policy;
pub mod replay;
pub mod report;
pub mod routing;
pub mod telemetry;
pub mod tokens;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use crate::config::Config;
pub use crate::http::app;
use crate::ledger::Ledger;
use crate::local::LocalBackend;
use crate::routing::{LengthScorer, Scorer};
use crate::upstream::Backend;
use crate::upstream::openai::OpenAiBackend;

/// Everything a request needs that can change when the configuration is reloaded. A
/// request loads it once, so it sees one consistent snapshot from start to end.
pub struct Runtime {
    pub config: Config,
    pub backends: HashMap<String, Arc<dyn Backend>>,
    pub scorer: Arc<dyn Scorer>,
    pub scorer_name: &'static str,
    /// Tiers that cannot serve, and why (e.g. a missing API key), for `/readyz`.
    pub tier_problems: BTreeMap<String, String>,
    /// Typed handles on the parts `/metrics` reads live: the classifier's counters and
    /// each local tier's queue.
    pub classifier: Option<Arc<classifier::Classifier>>,
    pub local_tiers: BTreeMap<String, Arc<LocalBackend>>,
}

impl Runtime {
    pub fn build(config: Config) -> Result<Runtime, String> {
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        let mut tier_problems = BTreeMap::new();
        let mut local_tiers = BTreeMap::new();
        for t in config.tiers.values() {
            match &t.backend {
                config::BackendConfig::OpenAi {
                    base_url,
                    api_key_env,
                    timeout,
                    connect_timeout,
                } => {
                    let b = OpenAiBackend::new(&t.name, base_url, api_key_env.as_deref(), *timeout, *connect_timeout)?;
                    if let Some(p) = b.missing_key() {
                        tier_problems.insert(t.name.clone(), p.to_owned());
                    }
                    backends.insert(t.name.clone(), Arc::new(b));
                }
                config::BackendConfig::Local(settings) => {
                    let b = Arc::new(LocalBackend::start(&t.name, &t.model, settings)?);
                    local_tiers.insert(t.name.clone(), b.clone());
                    backends.insert(t.name.clone(), b);
                }
            }
        }
        let length = LengthScorer {
            half_tokens: config.length_half_tokens,
        };
        let classifier = match &config.classifier {
            Some(c) => Some(Arc::new(classifier::Classifier::start(
                c,
                LengthScorer {
                    half_tokens: length.half_tokens,
                },
            )?)),
            None => None,
        };
        let (scorer, scorer_name): (Arc<dyn Scorer>, &'static str) = match &classifier {
            Some(c) => (c.clone(), "classifier"),
            None => (Arc::new(length), "length"),
        };
        Ok(Runtime {
            config,
            backends,
            scorer,
            scorer_name,
            tier_problems,
            classifier,
            local_tiers,
        })
    }
}

/// Shared state of a running gateway.
pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub ledger: Ledger,
    pub onnxruntime_version: String,
    pub metrics: Arc<telemetry::Metrics>,
    /// Keys, rate limits and budgets; kept across reloads so limits and spend carry on.
    pub auth: Arc<auth::Auth>,
}

impl AppState {
    /// Loads ONNX Runtime, opens the ledger and builds the runtime for `config`.
    pub fn start(config: Config) -> Result<Arc<AppState>, String> {
        let onnxruntime_version = onnx::init(config.onnxruntime_library.as_deref())?;
        let ledger = Ledger::start(
            &config.ledger.path,
            config.ledger.queue_capacity,
            config.ledger.batch_size,
        )?;
        let auth = Arc::new(auth::Auth::start(&config.auth, &config.ledger.path)?);
        let runtime = Runtime::build(config)?;
        let metrics = Arc::new(telemetry::Metrics::new(Some(ledger.clone())));
        Ok(Arc::new(AppState {
            runtime: ArcSwap::from_pointee(runtime),
            ledger,
            onnxruntime_version,
            metrics,
            auth,
        }))
    }
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish and flushes the
/// ledger.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let result = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    state.ledger.flush().await;
    result
}
