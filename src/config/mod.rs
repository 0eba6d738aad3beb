//! Gateway configuration: raw TOML structs (`*Toml`, unknown keys rejected) turned into a
//! validated [`Config`]. Nothing here touches the network or the disk beyond reading files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{AuthConfig, KeyLimits};
use crate::classifier::ClassifierConfig;
use crate::local::LocalSettings;
use crate::policy::Policy;
use crate::routing::sticky::StickinessConfig;
use crate::upstream::resilience::{BreakerConfig, RetryConfig, Timeouts};

/// A configuration that failed to load; the message names the file and the key path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(file: &Path, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("config `{}`: {msg}", file.display()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    listen: Option<String>,
    shutdown_grace_secs: Option<f64>,
    #[serde(default)]
    onnxruntime: OrtToml,
    #[serde(default)]
    ledger: LedgerToml,
    baseline: BaselineToml,
    routing: RoutingToml,
    tiers: BTreeMap<String, TierToml>,
    #[serde(default)]
    limits: LimitsToml,
    #[serde(default)]
    auth: AuthToml,
    #[serde(default)]
    telemetry: TelemetryToml,
    #[serde(default)]
    reload: ReloadToml,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthToml {
    enabled: Option<bool>,
    keys_db: Option<PathBuf>,
    cache_ttl_secs: Option<f64>,
    protect_reports: Option<bool>,
    protect_metrics: Option<bool>,
    default_rpm: Option<u32>,
    default_tpm: Option<u32>,
    default_daily_usd: Option<f64>,
    default_monthly_usd: Option<f64>,
    default_max_output_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrtToml {
    library: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerToml {
    path: Option<PathBuf>,
    queue_capacity: Option<usize>,
    batch_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaselineToml {
    model: String,
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingToml {
    #[serde(default = "default_aliases")]
    aliases: Vec<String>,
    policy: PathBuf,
    /// More policies, selectable per request as `model: "tiergate:<name>"`.
    #[serde(default)]
    policies: Vec<PathBuf>,
    /// A directory whose every `*.toml` is loaded like an entry of `policies`.
    policies_dir: Option<PathBuf>,
    #[serde(default)]
    stickiness: StickinessToml,
    #[serde(default)]
    scorer: Option<String>,
    #[serde(default)]
    length_scorer: LengthScorerToml,
    #[serde(default)]
    classifier: ClassifierToml,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StickinessToml {
    enabled: Option<bool>,
    ttl_secs: Option<f64>,
    capacity: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadToml {
    poll_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifierToml {
    encoder_dir: Option<PathBuf>,
    head: Option<PathBuf>,
    spec: Option<PathBuf>,
    workers: Option<usize>,
    threads_per_worker: Option<usize>,
    spinning: Option<bool>,
    encoder: Option<String>,
    max_batch: Option<usize>,
    queue_capacity: Option<usize>,
    cache_capacity: Option<u64>,
    timeout_ms: Option<f64>,
}

fn default_aliases() -> Vec<String> {
    vec!["tiergate-auto".to_owned()]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LengthScorerToml {
    half_tokens: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierToml {
    backend: String,
    model: String,
    base_url: Option<String>,
    api_key_env: Option<String>,
    #[serde(default)]
    input_usd_per_mtok: f64,
    #[serde(default)]
    output_usd_per_mtok: f64,
    machine_usd_per_hour: Option<f64>,
    machine_concurrency: Option<usize>,
    timeout_secs: Option<f64>,
    connect_timeout_secs: Option<f64>,
    ttft_timeout_secs: Option<f64>,
    max_retries: Option<u32>,
    retry_backoff_secs: Option<f64>,
    retry_backoff_max_secs: Option<f64>,
    breaker_failures: Option<u32>,
    breaker_failure_rate: Option<f64>,
    breaker_window_secs: Option<f64>,
    breaker_min_calls: Option<u32>,
    breaker_cooldown_secs: Option<f64>,
    // backend = "local"
    model_dir: Option<PathBuf>,
    threads: Option<usize>,
    spinning: Option<bool>,
    draft_tokens: Option<usize>,
    draft_head: Option<bool>,
    max_concurrent: Option<usize>,
    queue_capacity: Option<usize>,
    max_context_tokens: Option<usize>,
    default_max_tokens: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsToml {
    max_body_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    max_messages: Option<usize>,
    max_message_chars: Option<usize>,
    max_tokens: Option<u64>,
    body_timeout_secs: Option<f64>,
    header_timeout_secs: Option<f64>,
}

/// `[limits]`: the largest request the gateway accepts, each breach a 4xx naming the key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Total bytes of request header names and values.
    pub max_header_bytes: usize,
    pub max_messages: usize,
    /// Characters of one message's text (all its text parts together).
    pub max_message_chars: usize,
    /// Ceiling on `max_tokens` / `max_completion_tokens`.
    pub max_tokens: u64,
    /// How long a client may take to send its request body once its headers are in.
    pub body_timeout: Duration,
    /// How long a client may take to send a request head (and how long a keep-alive
    /// connection may sit idle); read when the gateway starts.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_header_bytes: 32 * 1024,
            max_messages: 1000,
            max_message_chars: 1_000_000,
            max_tokens: 131_072,
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryToml {
    otlp_endpoint: Option<String>,
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub listen: SocketAddr,
    /// `listen` as the file says it (`--listen` overrides only `listen`), so a reload can
    /// tell an edit of the file from the override.
    pub listen_in_file: SocketAddr,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    pub onnxruntime_library: Option<PathBuf>,
    pub ledger: LedgerConfig,
    pub baseline: Price,
    pub baseline_model: String,
    pub aliases: Vec<String>,
    /// The default policy: what the aliases (`tiergate-auto`) route with.
    pub policy: Policy,
    /// Every loaded policy by name, the default included (`model: "tiergate:<name>"`).
    pub policies: BTreeMap<String, Policy>,
    /// `routing.policies_dir`, resolved; watched so that a new file in it is loaded.
    pub policies_dir: Option<PathBuf>,
    pub stickiness: StickinessConfig,
    /// How often the config and policy files are checked for changes; `None`: only on SIGHUP.
    pub reload_poll: Option<Duration>,
    pub length_half_tokens: f64,
    /// `None`: the length scorer alone.
    pub classifier: Option<ClassifierConfig>,
    pub tiers: BTreeMap<String, TierConfig>,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP collector (`http://127.0.0.1:4318`); traces are exported
    /// only when set.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub path: PathBuf,
    pub queue_capacity: usize,
    pub batch_size: usize,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// For self-run tiers priced by the machine: USD per second of a request's share of
    /// the machine (`machine_usd_per_hour / 3600 / machine_concurrency`).
    pub machine_usd_per_second: f64,
}

impl Price {
    pub const fn per_mtok(input_per_mtok: f64, output_per_mtok: f64) -> Price {
        Price {
            input_per_mtok,
            output_per_mtok,
            machine_usd_per_second: 0.0,
        }
    }

    /// What tokens cost; machine time is added by [`Price::cost_with_time`].
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_per_mtok + completion_tokens as f64 * self.output_per_mtok) / 1_000_000.0
    }

    /// Tokens plus the machine time the call held: a local tier that answers in 2 s with 4
    /// sequences at once on a $0.36/h machine costs 2 × 0.36 / 3600 / 4 = $0.00005.
    pub fn cost_with_time(&self, prompt_tokens: u64, completion_tokens: u64, seconds: f64) -> f64 {
        self.cost(prompt_tokens, completion_tokens) + self.machine_usd_per_second * seconds.max(0.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    pub name: String,
    pub model: String,
    pub price: Price,
    pub backend: BackendConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    /// Any OpenAI-compatible HTTP server (OpenAI, vLLM, Ollama, llama.cpp server…).
    OpenAi {
        base_url: String,
        api_key_env: Option<String>,
        timeouts: Timeouts,
        retry: RetryConfig,
        breaker: BreakerConfig,
    },
    /// A small model answering in-process through ONNX Runtime (`crate::local`).
    Local(LocalSettings),
}

pub const BACKENDS: &[&str] = &["openai", "local"];

impl Config {
    /// Reads and validates a config file; relative paths inside it are resolved against
    /// the file's directory, so the gateway can be started from anywhere.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
        Self::parse(&text, path)
    }

    /// The files this config was read from, watched for hot reload.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.file.clone()];
        out.extend(self.policies.values().map(|p| p.file.clone()));
        out.extend(self.policies_dir.clone());
        // A head retrained in place (router-model/train.py) is picked up like a config edit.
        if let Some(c) = &self.classifier {
            out.extend([c.head.clone(), c.spec.clone()]);
        }
        out
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: ConfigToml = toml::from_str(text).map_err(|e| err(path, e))?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };

        let ConfigToml {
            listen,
            shutdown_grace_secs,
            onnxruntime,
            ledger,
            baseline,
            routing,
            tiers,
            limits,
            auth,
            telemetry,
            reload,
        } = raw;

        let listen = listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen.parse().map_err(|e| {
            err(
                path,
                format!("`listen` = `{listen}` is not an address like `127.0.0.1:8080`: {e}"),
            )
        })?;

        let shutdown_grace = secs(path, "shutdown_grace_secs", shutdown_grace_secs.unwrap_or(30.0))?;

        let OrtToml { library } = onnxruntime;
        let onnxruntime_library = library.as_deref().map(resolve);

        let LedgerToml {
            path: ledger_path,
            queue_capacity,
            batch_size,
        } = ledger;
        let ledger = LedgerConfig {
            path: db_file(
                path,
                "ledger.path",
                ledger_path.as_deref(),
                "tiergate-ledger.db",
                &resolve,
            )?,
            queue_capacity: positive(path, "ledger.queue_capacity", queue_capacity.unwrap_or(10_000))?,
            batch_size: positive(path, "ledger.batch_size", batch_size.unwrap_or(256))?,
        };

        let BaselineToml {
            model: baseline_model,
            input_usd_per_mtok,
            output_usd_per_mtok,
        } = baseline;
        if baseline_model.trim().is_empty() {
            return Err(err(
                path,
                "baseline.model must name the cloud model compared against, e.g. `gpt-4o`",
            ));
        }
        let baseline = Price::per_mtok(
            price(path, "baseline.input_usd_per_mtok", input_usd_per_mtok)?,
            price(path, "baseline.output_usd_per_mtok", output_usd_per_mtok)?,
        );

        if tiers.is_empty() {
            return Err(err(path, "`tiers` must define at least one tier, e.g. `[tiers.cloud]`"));
        }
        let mut out_tiers = BTreeMap::new();
        for (name, t) in tiers {
            // Names go into headers, the ledger, metrics labels and policy files.
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(err(
                    path,
                    format!("tier name `{name}` must be ASCII letters, digits, `_` or `-` (e.g. `[tiers.cloud]`)"),
                ));
            }
            let tier = tier(path, &name, t, &resolve)?;
            out_tiers.insert(name, tier);
        }
        let mut seen = std::collections::HashMap::new();
        for t in out_tiers.values() {
            if let Some(other) = seen.insert(t.model.clone(), t.name.clone()) {
                return Err(err(
                    path,
                    format!(
                        "tiers.{}.model and tiers.{other}.model both name `{}`; a model name must pick one tier",
                        t.name, t.model
                    ),
                ));
            }
        }

        let RoutingToml {
            aliases,
            policy,
            policies: extra_policies,
            policies_dir,
            stickiness,
            scorer,
            length_scorer,
            classifier,
        } = routing;
        if aliases.is_empty() {
            return Err(err(
                path,
                "routing.aliases must name at least one routed model, e.g. `[\"tiergate-auto\"]`",
            ));
        }
        // A name reserved for a policy (`tiergate:NAME`), an empty or repeated one, would
        // make which route a model name picks depend on lookup order.
        let reserved = crate::routing::POLICY_MODEL_PREFIX;
        if let Some(t) = out_tiers.values().find(|t| t.model.starts_with(reserved)) {
            return Err(err(
                path,
                format!(
                    "tiers.{}.model = `{}`: names starting with `{reserved}` select policies",
                    t.name, t.model
                ),
            ));
        }
        for (i, a) in aliases.iter().enumerate() {
            if a.trim().is_empty() || a.starts_with(reserved) || aliases[..i].contains(a) {
                return Err(err(
                    path,
                    format!(
                        "routing.aliases: `{a}` must be a non-empty name, listed once, not starting with `{reserved}`"
                    ),
                ));
            }
        }
        for a in &aliases {
            if let Some(t) = out_tiers.values().find(|t| &t.model == a) {
                return Err(err(
                    path,
                    format!(
                        "routing.aliases: `{a}` is also tiers.{}.model; pick another alias",
                        t.name
                    ),
                ));
            }
        }
        let policy =
            Policy::load(&resolve(&policy), &out_tiers).map_err(|e| err(path, format!("routing.policy: {e}")))?;
        let mut policies = BTreeMap::from([(policy.name.clone(), policy.clone())]);
        let mut extra: Vec<(String, PathBuf)> = extra_policies
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("routing.policies[{i}]"), resolve(p)))
            .collect();
        let policies_dir = policies_dir.as_deref().map(resolve);
        if let Some(dir) = &policies_dir {
            let entries = std::fs::read_dir(dir).map_err(|e| {
                err(
                    path,
                    format!("routing.policies_dir `{}`: cannot read: {e}", dir.display()),
                )
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a));
            for f in files {
                // The default policy (or a listed one) may live in the directory too.
                if same(&f, &policy.file) || extra.iter().any(|(_, e)| same(&f, e)) {
                    continue;
                }
                extra.push(("routing.policies_dir".to_owned(), f));
            }
        }
        for (key, file) in extra {
            let p = Policy::load(&file, &out_tiers).map_err(|e| err(path, format!("{key}: {e}")))?;
            if let Some(other) = policies.get(&p.name) {
                return Err(err(
                    path,
                    format!(
                        "{key}: `{}` and `{}` are both named `{}`; give one another `name`",
                        p.file.display(),
                        other.file.display(),
                        p.name
                    ),
                ));
            }
            policies.insert(p.name.clone(), p);
        }
        let StickinessToml {
            enabled,
            ttl_secs,
            capacity,
        } = stickiness;
        let stickiness = StickinessConfig {
            enabled: enabled.unwrap_or(true),
            ttl: secs(path, "routing.stickiness.ttl_secs", ttl_secs.unwrap_or(3600.0))?,
            capacity: positive(
                path,
                "routing.stickiness.capacity",
                capacity.unwrap_or(100_000) as usize,
            )? as u64,
        };
        let ReloadToml { poll_secs } = reload;
        // Each poll reads every watched file: more often than 10 times a second is load, not
        // freshness.
        let reload_poll = match poll_secs.unwrap_or(1.0) {
            0.0 => None,
            s if (0.1..=3600.0).contains(&s) => Some(Duration::from_secs_f64(s)),
            s => {
                return Err(err(
                    path,
                    format!("reload.poll_secs must be in [0.1, 3600] seconds, or 0 to reload only on SIGHUP; got {s}"),
                ));
            }
        };
        let LengthScorerToml { half_tokens } = length_scorer;
        let length_half_tokens = half_tokens.unwrap_or(128.0);
        if !(length_half_tokens.is_finite() && length_half_tokens > 0.0) {
            return Err(err(path, "routing.length_scorer.half_tokens must be > 0"));
        }

        let classifier = match scorer.as_deref().unwrap_or("length") {
            "length" => {
                // Checked all the same: a later switch to the classifier, often by hot reload,
                // should not be the first to hear of a bad key. The head is only needed then.
                let mut c = classifier;
                c.head.get_or_insert_with(|| PathBuf::from("head.onnx"));
                classifier_config(path, c, &resolve)?;
                None
            }
            "classifier" => Some(classifier_config(path, classifier, &resolve)?),
            other => {
                return Err(err(
                    path,
                    format!("routing.scorer = `{other}` is not a scorer; use `classifier` or `length`"),
                ));
            }
        };

        let LimitsToml {
            max_body_bytes,
            max_header_bytes,
            max_messages,
            max_message_chars,
            max_tokens,
            body_timeout_secs,
            header_timeout_secs,
        } = limits;
        let d = Limits::default();
        let limits = Limits {
            max_body_bytes: positive(
                path,
                "limits.max_body_bytes",
                max_body_bytes.unwrap_or(d.max_body_bytes),
            )?,
            max_header_bytes: positive(
                path,
                "limits.max_header_bytes",
                max_header_bytes.unwrap_or(d.max_header_bytes),
            )?,
            max_messages: positive(path, "limits.max_messages", max_messages.unwrap_or(d.max_messages))?,
            max_message_chars: positive(
                path,
                "limits.max_message_chars",
                max_message_chars.unwrap_or(d.max_message_chars),
            )?,
            max_tokens: positive(path, "limits.max_tokens", max_tokens.unwrap_or(d.max_tokens) as usize)? as u64,
            // An hour at most: a client may hold a connection this long without a request.
            body_timeout: body_timeout_secs.map_or(Ok(d.body_timeout), |v| {
                secs_at_most(path, "limits.body_timeout_secs", v, 3600.0)
            })?,
            header_timeout: header_timeout_secs.map_or(Ok(d.header_timeout), |v| {
                secs_at_most(path, "limits.header_timeout_secs", v, 3600.0)
            })?,
        };
        let auth = auth_config(path, auth, &resolve)?;

        let TelemetryToml { otlp_endpoint } = telemetry;
        if let Some(e) = &otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(err(
                path,
                format!(
                    "telemetry.otlp_endpoint = `{e}` must be an http(s) URL of an OTLP/HTTP collector, e.g. `http://127.0.0.1:4318`"
                ),
            ));
        }
        let telemetry = TelemetryConfig { otlp_endpoint };

        Ok(Config {
            file: path.to_path_buf(),
            listen,
            listen_in_file: listen,
            shutdown_grace,
            onnxruntime_library,
            ledger,
            baseline,
            baseline_model,
            aliases,
            policy,
            policies,
            policies_dir,
            stickiness,
            reload_poll,
            length_half_tokens,
            classifier,
            tiers: out_tiers,
            limits,
            auth,
            telemetry,
        })
    }
}

fn tier(file: &Path, name: &str, t: TierToml, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<TierConfig, ConfigError> {
    let TierToml {
        backend,
        model,
        base_url,
        api_key_env,
        input_usd_per_mtok,
        output_usd_per_mtok,
        machine_usd_per_hour,
        machine_concurrency,
        timeout_secs,
        connect_timeout_secs,
        ttft_timeout_secs,
        max_retries,
        retry_backoff_secs,
        retry_backoff_max_secs,
        breaker_failures,
        breaker_failure_rate,
        breaker_window_secs,
        breaker_min_calls,
        breaker_cooldown_secs,
        model_dir,
        threads,
        spinning,
        draft_tokens,
        draft_head,
        max_concurrent,
        queue_capacity,
        max_context_tokens,
        default_max_tokens,
    } = t;
    let key = |k: &str| format!("tiers.{name}.{k}");
    let per_hour = price(file, &key("machine_usd_per_hour"), machine_usd_per_hour.unwrap_or(0.0))?;
    // A machine answering several requests at once bills each for its share.
    let default_concurrency = if backend == "local" {
        max_concurrent.unwrap_or(4).max(1)
    } else {
        1
    };
    let concurrency = positive(
        file,
        &key("machine_concurrency"),
        machine_concurrency.unwrap_or(default_concurrency),
    )?;
    let price = Price {
        input_per_mtok: price(file, &key("input_usd_per_mtok"), input_usd_per_mtok)?,
        output_per_mtok: price(file, &key("output_usd_per_mtok"), output_usd_per_mtok)?,
        machine_usd_per_second: per_hour / 3600.0 / concurrency as f64,
    };
    if model.trim().is_empty() {
        return Err(err(file, format!("{} must not be empty", key("model"))));
    }
    // Keys that belong to the other backend are mistakes, not options to ignore.
    let only_for = |backend_name: &str, keys: &[(&str, bool)]| -> Result<(), ConfigError> {
        match keys.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err(err(
                file,
                format!(
                    "{} is only valid for backend `{backend_name}`, and tiers.{name}.backend is `{backend}`",
                    key(k)
                ),
            )),
            None => Ok(()),
        }
    };
    let backend = match backend.as_str() {
        "openai" => {
            only_for(
                "local",
                &[
                    ("model_dir", model_dir.is_some()),
                    ("threads", threads.is_some()),
                    ("spinning", spinning.is_some()),
                    ("draft_tokens", draft_tokens.is_some()),
                    ("draft_head", draft_head.is_some()),
                    ("max_concurrent", max_concurrent.is_some()),
                    ("queue_capacity", queue_capacity.is_some()),
                    ("max_context_tokens", max_context_tokens.is_some()),
                    ("default_max_tokens", default_max_tokens.is_some()),
                ],
            )?;
            let Some(base_url) = base_url else {
                return Err(err(
                    file,
                    format!(
                        "{} is required for backend `openai`, e.g. `https://api.openai.com/v1`",
                        key("base_url")
                    ),
                ));
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(err(
                    file,
                    format!("{} must start with `http://` or `https://`", key("base_url")),
                ));
            }
            let total = secs(file, &key("timeout_secs"), timeout_secs.unwrap_or(120.0))?;
            let timeouts = Timeouts {
                connect: secs(
                    file,
                    &key("connect_timeout_secs"),
                    connect_timeout_secs.unwrap_or(5f64.min(total.as_secs_f64())),
                )?,
                // Unset: only the total limit applies to the first token too.
                first_token: secs(
                    file,
                    &key("ttft_timeout_secs"),
                    ttft_timeout_secs.unwrap_or(total.as_secs_f64()),
                )?,
                total,
            };
            for (limit, name) in [
                (timeouts.connect, "connect_timeout_secs"),
                (timeouts.first_token, "ttft_timeout_secs"),
            ] {
                if limit > timeouts.total {
                    return Err(err(
                        file,
                        format!(
                            "{} is longer than {}, so it would never apply",
                            key(name),
                            key("timeout_secs")
                        ),
                    ));
                }
            }
            if api_key_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(err(
                    file,
                    format!(
                        "{} must name an environment variable, e.g. `OPENAI_API_KEY`",
                        key("api_key_env")
                    ),
                ));
            }
            let d = RetryConfig::default();
            let retry = RetryConfig {
                max_retries: max_retries.unwrap_or(d.max_retries),
                backoff: secs(
                    file,
                    &key("retry_backoff_secs"),
                    retry_backoff_secs.unwrap_or(d.backoff.as_secs_f64()),
                )?,
                backoff_max: secs(
                    file,
                    &key("retry_backoff_max_secs"),
                    retry_backoff_max_secs.unwrap_or(d.backoff_max.as_secs_f64()),
                )?,
            };
            if retry.backoff > retry.backoff_max {
                return Err(err(
                    file,
                    format!(
                        "{} is longer than {} ({} s)",
                        key("retry_backoff_secs"),
                        key("retry_backoff_max_secs"),
                        retry.backoff_max.as_secs_f64()
                    ),
                ));
            }
            let d = BreakerConfig::default();
            let failure_rate = breaker_failure_rate.unwrap_or(d.failure_rate);
            if !(failure_rate > 0.0 && failure_rate <= 1.0) {
                return Err(err(file, format!("{} must be in (0, 1]", key("breaker_failure_rate"))));
            }
            let breaker = BreakerConfig {
                consecutive_failures: positive(
                    file,
                    &key("breaker_failures"),
                    breaker_failures.unwrap_or(d.consecutive_failures) as usize,
                )? as u32,
                failure_rate,
                window: secs(
                    file,
                    &key("breaker_window_secs"),
                    breaker_window_secs.unwrap_or(d.window.as_secs_f64()),
                )?,
                min_calls: positive(
                    file,
                    &key("breaker_min_calls"),
                    breaker_min_calls.unwrap_or(d.min_calls) as usize,
                )? as u32,
                cooldown: secs(
                    file,
                    &key("breaker_cooldown_secs"),
                    breaker_cooldown_secs.unwrap_or(d.cooldown.as_secs_f64()),
                )?,
            };
            BackendConfig::OpenAi {
                base_url: base_url.trim_end_matches('/').to_owned(),
                api_key_env,
                timeouts,
                retry,
                breaker,
            }
        }
        "local" => {
            only_for(
                "openai",
                &[
                    ("base_url", base_url.is_some()),
                    ("api_key_env", api_key_env.is_some()),
                    ("timeout_secs", timeout_secs.is_some()),
                    ("connect_timeout_secs", connect_timeout_secs.is_some()),
                    ("ttft_timeout_secs", ttft_timeout_secs.is_some()),
                    ("max_retries", max_retries.is_some()),
                    ("retry_backoff_secs", retry_backoff_secs.is_some()),
                    ("retry_backoff_max_secs", retry_backoff_max_secs.is_some()),
                    ("breaker_failures", breaker_failures.is_some()),
                    ("breaker_failure_rate", breaker_failure_rate.is_some()),
                    ("breaker_window_secs", breaker_window_secs.is_some()),
                    ("breaker_min_calls", breaker_min_calls.is_some()),
                    ("breaker_cooldown_secs", breaker_cooldown_secs.is_some()),
                ],
            )?;
            let model_dir = match model_dir {
                Some(d) => resolve(&d),
                // The provisioning script puts models under the cache, named as the tier's
                // `model` (e.g. `qwen2.5-coder-0.5b-instruct`).
                None => crate::cache::cache_dir().join("models").join(&model),
            };
            let default_threads = std::thread::available_parallelism()
                .map(|n| n.get().min(4))
                .unwrap_or(2);
            let optional_positive = |k: &str, v: Option<usize>| -> Result<Option<usize>, ConfigError> {
                v.map(|v| positive(file, &key(k), v)).transpose()
            };
            BackendConfig::Local(LocalSettings {
                model_dir,
                threads: positive(file, &key("threads"), threads.unwrap_or(default_threads))?,
                // Off by default: on a machine shared with other work, spinning ONNX Runtime
                // threads halve decode speed (BENCHMARKS.md, "Local generator").
                spinning: spinning.unwrap_or(false),
                draft_tokens,
                draft_head: draft_head.unwrap_or(true),
                max_concurrent: positive(file, &key("max_concurrent"), max_concurrent.unwrap_or(4))?,
                queue_capacity: queue_capacity.unwrap_or(16),
                max_context_tokens: optional_positive("max_context_tokens", max_context_tokens)?,
                default_max_tokens: optional_positive("default_max_tokens", default_max_tokens)?,
            })
        }
        other => {
            return Err(err(
                file,
                format!(
                    "{} = `{other}` is not a known backend; use one of {}",
                    key("backend"),
                    BACKENDS.join(", ")
                ),
            ));
        }
    };
    Ok(TierConfig {
        name: name.to_owned(),
        model,
        price,
        backend,
    })
}

fn classifier_config(
    file: &Path,
    c: ClassifierToml,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ClassifierConfig, ConfigError> {
    let ClassifierToml {
        encoder_dir,
        head,
        spec,
        workers,
        threads_per_worker,
        spinning,
        encoder,
        max_batch,
        queue_capacity,
        cache_capacity,
        timeout_ms,
    } = c;
    let float_encoder = match encoder.as_deref().unwrap_or("auto") {
        "auto" => false,
        "float" => true,
        other => {
            return Err(err(
                file,
                format!("routing.classifier.encoder must be \"auto\" or \"float\", not {other:?}"),
            ));
        }
    };
    let Some(head) = head.as_deref().map(resolve) else {
        return Err(err(
            file,
            "routing.classifier.head is required with `scorer = \"classifier\"`, e.g. `\"../router-model/head.onnx\"`",
        ));
    };
    let spec = spec
        .as_deref()
        .map(resolve)
        .unwrap_or_else(|| head.with_extension("json"));
    let encoder_dir = encoder_dir
        .as_deref()
        .map(resolve)
        .unwrap_or_else(|| crate::cache::cache_dir().join("models").join("all-minilm-l6-v2-int8"));
    let timeout_ms = timeout_ms.unwrap_or(50.0);
    // Bounded above too: `Duration::from_secs_f64` panics on what it cannot hold.
    if !(timeout_ms.is_finite() && timeout_ms > 0.0 && timeout_ms <= 1e12) {
        return Err(err(
            file,
            "routing.classifier.timeout_ms must be > 0 (and at most 1e12)",
        ));
    }
    Ok(ClassifierConfig {
        encoder_dir,
        head,
        spec,
        workers: positive(file, "routing.classifier.workers", workers.unwrap_or(1))?,
        threads_per_worker: positive(
            file,
            "routing.classifier.threads_per_worker",
            // Never more threads than the CPUs this process may run on (taskset, cgroups).
            threads_per_worker.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2))),
        )?,
        // On by default (ONNX Runtime's own default): a score takes ~25 % less time with
        // its threads spinning (BENCHMARKS.md, "Classifier latency"), and the thread count
        // above never exceeds the CPUs, where spinning would starve the async workers.
        spinning: spinning.unwrap_or(true),
        float_encoder,
        max_batch: positive(file, "routing.classifier.max_batch", max_batch.unwrap_or(8))?,
        queue_capacity: positive(file, "routing.classifier.queue_capacity", queue_capacity.unwrap_or(64))?,
        cache_capacity: cache_capacity.unwrap_or(10_000),
        timeout: Duration::from_secs_f64(timeout_ms / 1000.0),
    })
}

fn auth_config(file: &Path, a: AuthToml, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<AuthConfig, ConfigError> {
    let AuthToml {
        enabled,
        keys_db,
        cache_ttl_secs,
        protect_reports,
        protect_metrics,
        default_rpm,
        default_tpm,
        default_daily_usd,
        default_monthly_usd,
        default_max_output_tokens,
    } = a;
    for (key, v) in [("auth.default_rpm", default_rpm), ("auth.default_tpm", default_tpm)] {
        if v == Some(0) {
            return Err(err(file, format!("{key} must be > 0; leave it out for no limit")));
        }
    }
    for (key, v) in [
        ("auth.default_daily_usd", default_daily_usd),
        ("auth.default_monthly_usd", default_monthly_usd),
    ] {
        if let Some(v) = v {
            price(file, key, v)?;
        }
    }
    Ok(AuthConfig {
        // On unless switched off: a gateway in front of a paid API must not be open by accident.
        enabled: enabled.unwrap_or(true),
        keys_db: db_file(file, "auth.keys_db", keys_db.as_deref(), "tiergate-keys.db", resolve)?,
        cache_ttl: secs(file, "auth.cache_ttl_secs", cache_ttl_secs.unwrap_or(5.0))?,
        protect_reports: protect_reports.unwrap_or(true),
        protect_metrics: protect_metrics.unwrap_or(false),
        defaults: KeyLimits {
            rpm: default_rpm,
            tpm: default_tpm,
            daily_usd: default_daily_usd,
            monthly_usd: default_monthly_usd,
        },
        default_max_output_tokens: positive(
            file,
            "auth.default_max_output_tokens",
            default_max_output_tokens.unwrap_or(4096) as usize,
        )? as u64,
    })
}

fn price(file: &Path, key: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(err(file, format!("{key} must be a number >= 0")))
    }
}

/// Seconds as a `Duration`. The bound keeps `Duration::from_secs_f64` from panicking on a
/// value it cannot hold (`timeout_secs = 1e300` used to crash the config load).
fn secs(file: &Path, key: &str, v: f64) -> Result<Duration, ConfigError> {
    secs_at_most(file, key, v, 1e9)
}

fn secs_at_most(file: &Path, key: &str, v: f64, max: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v <= max {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(err(
            file,
            format!("{key} must be > 0 and at most {max} seconds, got {v}"),
        ))
    }
}

/// A SQLite file the gateway keeps: a path, not what SQLite would read as a database that
/// vanishes at exit (`:memory:`, an empty name, a `file:` URI) nor a directory.
fn db_file(
    file: &Path,
    key: &str,
    v: Option<&Path>,
    default: &str,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<PathBuf, ConfigError> {
    let Some(v) = v else {
        return Ok(resolve(Path::new(default)));
    };
    let text = v.to_string_lossy();
    if text.trim().is_empty() || text.starts_with(":memory:") || text.starts_with("file:") {
        return Err(err(
            file,
            format!(
                "{key} = `{text}` must be the path of a file (what it holds must outlive the process), e.g. `{default}`"
            ),
        ));
    }
    let p = resolve(v);
    if p.is_dir() {
        return Err(err(
            file,
            format!(
                "{key} = `{text}` is a directory; name a file in it, e.g. `{}`",
                p.join(default).display()
            ),
        ));
    }
    Ok(p)
}

fn positive(file: &Path, key: &str, v: usize) -> Result<usize, ConfigError> {
    if v > 0 {
        Ok(v)
    } else {
        Err(err(file, format!("{key} must be > 0")))
    }
}

#[cfg(test)]
mod tests;
