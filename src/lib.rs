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
pub mod reload;
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
    /// Conversations' sticky tiers; `None` when `routing.stickiness.enabled = false`.
    pub stickiness: Option<Arc<routing::sticky::Stickiness>>,
    /// Each HTTP tier's retry settings and circuit breaker.
    pub guards: BTreeMap<String, upstream::Guard>,
}

impl Runtime {
    /// Whether `tier` can be called at all (its API key is there): a tier that cannot is
    /// passed over in spill, fallback and escalation, and holds no budget.
    pub fn can_call(&self, tier: &str) -> bool {
        !self.tier_problems.contains_key(tier)
    }

    pub fn build(config: Config) -> Result<Runtime, String> {
        Self::rebuild(config, None)
    }

    /// Builds a runtime for `config`, taking over from `old` whatever did not change: the
    /// classifier (its ONNX sessions), local tiers' engines (their loaded models) and the
    /// stickiness store, so a reload that only touches a policy loads no model.
    pub fn rebuild(config: Config, old: Option<&Runtime>) -> Result<Runtime, String> {
        // Loaded on first need only: a gateway that routes by length to remote tiers runs
        // without the library (a reload that adds a classifier or local tier loads it).
        let needs_onnxruntime = config.classifier.is_some()
            || config
                .tiers
                .values()
                .any(|t| matches!(t.backend, config::BackendConfig::Local(_)));
        if needs_onnxruntime {
            onnx::init(config.onnxruntime_library.as_deref())?;
        }
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        let mut tier_problems = BTreeMap::new();
        let mut local_tiers = BTreeMap::new();
        let mut guards = BTreeMap::new();
        for t in config.tiers.values() {
            match &t.backend {
                config::BackendConfig::OpenAi {
                    base_url,
                    api_key_env,
                    timeouts,
                    retry,
                    breaker,
                } => {
                    let b = OpenAiBackend::new(&t.name, base_url, api_key_env.as_deref(), *timeouts)?;
                    guards.insert(
                        t.name.clone(),
                        upstream::Guard {
                            retry: *retry,
                            breaker: Some(Arc::new(upstream::resilience::Breaker::new(*breaker))),
                        },
                    );
                    if let Some(p) = b.missing_key() {
                        tier_problems.insert(t.name.clone(), p.to_owned());
                    }
                    backends.insert(t.name.clone(), Arc::new(b));
                }
                config::BackendConfig::Local(settings) => {
                    let reused = old
                        .filter(|o| o.config.tiers.get(&t.name) == Some(t))
                        .and_then(|o| o.local_tiers.get(&t.name).cloned());
                    let b = match reused {
                        Some(b) => b,
                        None => Arc::new(LocalBackend::start(&t.name, &t.model, settings)?),
                    };
                    local_tiers.insert(t.name.clone(), b.clone());
                    backends.insert(t.name.clone(), b);
                }
            }
        }
        let length = LengthScorer {
            half_tokens: config.length_half_tokens,
        };
        let old_classifier = old
            .filter(|o| {
                o.config.classifier == config.classifier && o.config.length_half_tokens == config.length_half_tokens
            })
            .and_then(|o| o.classifier.clone())
            .filter(|c| {
                config
                    .classifier
                    .as_ref()
                    .is_some_and(|cfg| classifier::file_stamps(cfg) == c.stamps)
            });
        let classifier = match &config.classifier {
            Some(_) if old_classifier.is_some() => old_classifier,
            Some(c) => Some(Arc::new(
                classifier::Classifier::start(
                    c,
                    LengthScorer {
                        half_tokens: length.half_tokens,
                    },
                )
                // Like every config error: which file and section it came from.
                .map_err(|e| format!("config `{}`: routing.classifier: {e}", config.file.display()))?,
            )),
            None => None,
        };
        let (scorer, scorer_name): (Arc<dyn Scorer>, &'static str) = match &classifier {
            Some(c) => (c.clone(), "classifier"),
            None => (Arc::new(length), "length"),
        };
        let stickiness = match old {
            Some(o) if o.config.stickiness == config.stickiness => o.stickiness.clone(),
            _ if config.stickiness.enabled => Some(Arc::new(routing::sticky::Stickiness::new(&config.stickiness))),
            _ => None,
        };
        Ok(Runtime {
            config,
            backends,
            scorer,
            scorer_name,
            tier_problems,
            classifier,
            local_tiers,
            stickiness,
            guards,
        })
    }
}

/// Shared state of a running gateway.
pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub ledger: Ledger,
    pub metrics: Arc<telemetry::Metrics>,
    /// Keys, rate limits and budgets; kept across reloads so limits and spend carry on.
    pub auth: Arc<auth::Auth>,
    /// The last reload's outcome, for `/readyz` and `/metrics`.
    pub reload: reload::ReloadState,
    /// Cancelled when the shutdown grace period is over: requests still running end with
    /// a `shutting_down` error and still write their ledger rows.
    pub cut: tokio_util::sync::CancellationToken,
    pub in_flight: Arc<InFlight>,
}

/// Chat requests being answered (a stream counts until its last byte), so shutdown can
/// wait for the ones it cut to write their rows.
#[derive(Default)]
pub struct InFlight {
    n: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request in flight; dropping it ends it.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.n.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until no request is in flight, at most `limit`; false if some still are.
    pub async fn drained(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                // Created before the check, so a wake-up between the two is not missed.
                let idle = self.idle.notified();
                if self.count() == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl AppState {
    /// Opens the ledger and builds the runtime for `config` (loading ONNX Runtime if it
    /// needs it).
    pub fn start(config: Config) -> Result<Arc<AppState>, String> {
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
            metrics,
            reload: reload::ReloadState::default(),
            cut: tokio_util::sync::CancellationToken::new(),
            in_flight: Arc::default(),
            auth,
        }))
    }
}

/// How long cut requests get to answer and queue their rows.
const CUT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts connections until `shutdown` resolves, then closes idle ones and waits for the
/// rest to finish their requests: `axum::serve`, plus what it does not let one set. A
/// client must send its request head within `header_timeout` (hyper then drops the
/// connection; the same bound closes a keep-alive connection idle that long), so slow or
/// stalled clients cannot hold connections open for ever.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // A client that gave up before we accepted it: nothing to do. Anything
                    // else (out of file descriptors) may pass once connections close.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!("accept error: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without it, Nagle's algorithm holds each small SSE write until the client's
        // delayed ACK: ~40 ms added to every streamed answer (measured by scripts/bench-load).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on an accepted connection: {e}");
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with an error: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves until `shutdown` yields, then stops accepting, lets in-flight requests finish
/// for up to the config's `shutdown_grace` (or until `shutdown` yields again: the operator
/// is in a hurry), cuts what is still running, and flushes the ledger. Meanwhile the config
/// and policy files are watched and reloaded when they change (and on SIGHUP, see
/// [`reload::watch`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl futures::Stream<Item = ()> + Send + 'static,
) -> std::io::Result<()> {
    use futures::StreamExt;
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(reload::watch(state.clone(), stop.clone()));
    // Read when the signal comes, so that a reload can change it.
    let grace = {
        let state = state.clone();
        move || state.runtime.load().config.shutdown_grace
    };
    let header_timeout = state.runtime.load().config.limits.header_timeout;
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let (hurrying, hurry) = tokio::sync::oneshot::channel::<()>();
    let (grace_at_signal, grace_at_deadline) = (grace.clone(), grace.clone());
    let server = serve_connections(listener, app(state.clone()), header_timeout, async move {
        let mut shutdown = Box::pin(shutdown);
        if shutdown.next().await.is_none() {
            return std::future::pending().await;
        }
        tracing::info!(
            grace_secs = grace_at_signal().as_secs_f64(),
            "shutting down: no new connections; in-flight requests may finish (signal again to cut them now)"
        );
        let _ = stopping.send(());
        tokio::spawn(async move {
            if shutdown.next().await.is_some() {
                let _ = hurrying.send(());
            }
        });
    });
    let deadline = async move {
        match stopped.await {
            Ok(()) => tokio::select! {
                () = tokio::time::sleep(grace_at_deadline()) => {}
                Ok(()) = hurry => tracing::warn!("asked again to stop: ending the grace period now"),
            },
            // The server ended on its own: no deadline to enforce.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let cut = async {
        tracing::warn!(
            grace_secs = grace().as_secs_f64(),
            cut = state.in_flight.count(),
            "shutdown grace period over; requests still running are cut"
        );
        // They answer `shutting_down` (JSON, or a final SSE event) and write their rows.
        state.cut.cancel();
        if !state.in_flight.drained(CUT_WAIT).await {
            tracing::error!(
                left = state.in_flight.count(),
                "cut requests did not end; their rows may be missing"
            );
        }
    };
    let result = tokio::select! {
        r = server => {
            // Whole answers whose client left are on no connection, so the server did not
            // wait for them: their tier calls end within the grace period or are cut.
            tokio::select! {
                _ = state.in_flight.drained(std::time::Duration::MAX) => {}
                () = &mut deadline => cut.await,
            }
            r
        }
        () = &mut deadline => {
            cut.await;
            Ok(())
        }
    };
    stop.cancel();
    let _ = watcher.await;
    state.ledger.flush().await;
    result
}
