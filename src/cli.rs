//! Command-line interface: parses arguments and runs the chosen command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "tiergate",
    version,
    about = "OpenAI-compatible gateway that routes each request to the cheapest tier able to answer it"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway. The config and policy files are reloaded when they change
    /// (`reload.poll_secs`) and on SIGHUP, if the new version validates. On SIGTERM or
    /// Ctrl-C it stops accepting connections, lets in-flight requests finish for up to
    /// `shutdown_grace_secs` (config), then closes the ledger.
    Serve {
        /// Gateway configuration (TOML).
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
        /// Listen address; overrides `listen` in the config.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration and its policies without starting the gateway; warn (exit 0)
    /// of what this machine lacks: a tier's API key variable, the classifier's or a local
    /// tier's model files, a usable ledger file.
    Check {
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
    },
    /// Show the score, rule, tier, fallback chain and cost estimate the gateway would pick
    /// for a prompt, without calling any model.
    Explain {
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
        /// Model to request (a routing alias, `tiergate:<policy>` or a tier's model);
        /// default: the first alias.
        #[arg(long)]
        model: Option<String>,
        /// Route with this policy file instead of the config's default policy.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// A system prompt to send with the text.
        #[arg(long)]
        system: Option<String>,
        /// A request header, as `NAME: VALUE`, for rules with `headers` conditions (and
        /// `x-tiergate-tier`); repeatable.
        #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
        headers: Vec<(axum::http::HeaderName, axum::http::HeaderValue)>,
        /// Print JSON (as `POST /v1/route` returns) instead of text.
        #[arg(long)]
        json: bool,
        /// The user message.
        text: String,
    },
    /// Score texts with the configured classifier, exactly as the gateway does (used by
    /// `router-model/eval` to evaluate the router through the Rust path).
    Score {
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
        /// Use this head instead of the config's (its spec is the `.json` beside it).
        #[arg(long)]
        head: Option<PathBuf>,
        /// JSONL with `{"id": …, "text": …}` per line (`text` is the scored text).
        #[arg(long)]
        input: PathBuf,
        /// JSONL written with `{"id": …, "score": …}` per line.
        #[arg(long)]
        output: PathBuf,
    },
    /// Cost-savings report from the ledger: per tier cost, tokens, latency percentiles and
    /// errors; actual cost against sending everything to the baseline model.
    Report {
        #[command(flatten)]
        source: LedgerArgs,
        #[command(flatten)]
        filter: crate::report::FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: crate::report::render::Format,
    },
    /// Validate and calibrate routing policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Manage virtual API keys: the keys clients send as `Authorization: Bearer tg-…`.
    /// Stored hashed in `auth.keys_db`, shared with the running gateway, which sees a new or
    /// revoked key within `auth.cache_ttl_secs` (default 5 s).
    Keys {
        #[command(flatten)]
        store: KeysDbArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Send a recorded workload (one chat request body per line) through a running gateway,
    /// then print the report for exactly those requests.
    Replay {
        #[command(flatten)]
        args: crate::replay::ReplayArgs,
        /// Format of the report printed at the end.
        #[arg(long, value_enum, default_value = "table")]
        format: crate::report::render::Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files without starting the gateway: prints `ok FILE` for each valid
    /// one; otherwise the errors (file, key path, line, what to do) and exit status 1.
    Check {
        /// Configuration whose tiers the policies may name.
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
        /// Policy files to check (TOML, as `routing.policy` takes them).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Pick the score threshold that sends a target share of a sample workload to the cloud
    /// tier, scoring it with the configured scorer; `--write` puts it in the policy file.
    Calibrate {
        #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
        config: PathBuf,
        /// Share of the sample to send to the cloud tier, in 0..=1.
        #[arg(long)]
        target_cloud_share: f64,
        /// JSONL workload, one chat request body per line (as `tiergate replay` reads).
        #[arg(long, value_name = "FILE")]
        sample: PathBuf,
        /// Policy file to calibrate; default: the config's `routing.policy`.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Rule whose threshold is set; default: the first rule with `score_below` or
        /// `score_at_least`.
        #[arg(long)]
        rule: Option<String>,
        /// The cloud tier; default: the costliest configured tier.
        #[arg(long)]
        cloud_tier: Option<String>,
        /// Rewrite the threshold in the policy file (comments and layout are kept).
        #[arg(long)]
        write: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret on stdout. The secret is shown once: only its
    /// hash is stored. Limits left out fall back to `[auth]`'s defaults.
    Create {
        /// A unique name (names stay taken after revocation); at most 128 characters, no
        /// control characters.
        #[arg(long)]
        name: String,
        /// Team the key belongs to, for listings (same rules as `--name`).
        #[arg(long)]
        team: Option<String>,
        /// Requests per minute.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rpm: Option<u32>,
        /// Tokens per minute: each request counts its estimated prompt tokens plus `max_tokens`
        /// (else `auth.default_max_output_tokens`) times `n`.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        tpm: Option<u32>,
        /// USD per UTC day on paid tiers.
        #[arg(long)]
        daily_usd: Option<f64>,
        /// USD per UTC month on paid tiers.
        #[arg(long)]
        monthly_usd: Option<f64>,
    },
    /// List keys: name, id, prefix, team, limits, created, revoked. Never the secrets.
    List,
    /// Revoke a key by name or id. The gateway refuses it within `auth.cache_ttl_secs`.
    Revoke {
        /// The key's name or id (`key_…`).
        key: String,
    },
}

/// Which key store to use.
#[derive(Debug, clap::Args)]
pub struct KeysDbArgs {
    /// Key store file. Default: `auth.keys_db` of `--config`.
    #[arg(long, value_name = "FILE", global = true)]
    pub keys_db: Option<PathBuf>,
    /// Gateway configuration whose `auth.keys_db` is used when no `--keys-db` is given.
    #[arg(
        long,
        short,
        env = "TIERGATE_CONFIG",
        default_value = "examples/tiergate.toml",
        global = true
    )]
    pub config: PathBuf,
}

/// Which ledger files to read.
#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    /// Ledger file to read; repeat it to aggregate the ledgers of several replicas into one
    /// report. Default: `ledger.path` of `--config`.
    #[arg(long = "ledger", value_name = "FILE")]
    pub ledgers: Vec<PathBuf>,
    /// Gateway configuration whose `ledger.path` is read when no `--ledger` is given.
    #[arg(long, short, env = "TIERGATE_CONFIG", default_value = "examples/tiergate.toml")]
    pub config: PathBuf,
}

impl LedgerArgs {
    pub fn paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.ledgers.is_empty() {
            return Ok(self.ledgers.clone());
        }
        Ok(vec![Config::load(&self.config)?.ledger.path])
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen } => {
            let mut config = Config::load(&config)?;
            let tracing = crate::telemetry::init(config.telemetry.otlp_endpoint.as_deref())?;
            if let Some(l) = listen {
                config.listen = l;
            }
            let addr = config.listen;
            if config.auth.enabled {
                let store = crate::auth::KeyStore::open(&config.auth.keys_db).map_err(anyhow::Error::msg)?;
                let live = store
                    .list()
                    .map_err(anyhow::Error::msg)?
                    .iter()
                    .filter(|k| k.revoked_ms.is_none())
                    .count();
                if live == 0 {
                    tracing::warn!(keys_db = %config.auth.keys_db.display(), "no live keys: every request will get a 401; create one with `tiergate keys create --name NAME`");
                } else {
                    tracing::info!(keys_db = %config.auth.keys_db.display(), live, "clients need a key (`tiergate keys create`)");
                }
            } else {
                tracing::warn!(
                    "AUTH IS OFF (`[auth] enabled = false`): anyone who can reach {addr} can use every tier, paid ones included, without a key, rate limit or budget. Use this only for local development."
                );
            }
            let _ledger_lock = lock_ledger(&config.ledger.path)?;
            let state = crate::AppState::start(config).map_err(anyhow::Error::msg)?;
            {
                let rt = state.runtime.load();
                for (tier, problem) in &rt.tier_problems {
                    tracing::warn!(tier = %tier, "tier not usable: {problem}");
                }
            }
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on `{addr}`: {e}"))?;
            tracing::info!(
                listen = %listener.local_addr()?,
                onnxruntime = %crate::onnx::loaded_version().unwrap_or_else(|| "not loaded (not needed)".to_owned()),
                ledger = %state.ledger.path().display(),
                "tiergate ready"
            );
            crate::serve(listener, state.clone(), shutdown_signals()).await?;
            let ledger = state.ledger.clone();
            ledger.shutdown().await;
            tracing.shutdown().await;
            tracing::info!("stopped; ledger and traces flushed");
            Ok(())
        }
        Command::Explain {
            config,
            model,
            policy,
            system,
            headers,
            json,
            text,
        } => {
            let mut config = Config::load(&config)?;
            if let Some(p) = policy {
                let p = crate::policy::Policy::load(&p, &config.tiers).map_err(anyhow::Error::msg)?;
                config.policies.insert(p.name.clone(), p.clone());
                config.policy = p;
            }
            let model = model.unwrap_or_else(|| config.aliases[0].clone());
            let rt = crate::Runtime::build(config).map_err(anyhow::Error::msg)?;
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(serde_json::json!({"role": "system", "content": s}));
            }
            messages.push(serde_json::json!({"role": "user", "content": text}));
            let body = serde_json::json!({"model": model, "messages": messages}).to_string();
            let req = crate::openai::ChatRequest::parse(body.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
            let ctx = crate::routing::RequestContext::from_headers(&headers.into_iter().collect());
            let mut e = crate::routing::explain_with(&rt.config, &rt.scorer, &req, &ctx, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            e.note_unusable(&rt.tier_problems);
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print_explanation(&e);
            }
            Ok(())
        }
        Command::Score {
            config,
            head,
            input,
            output,
        } => score_file(&config, head, &input, &output).await,
        Command::Check { config } => {
            let _tracing = crate::telemetry::init(None)?;
            let c = Config::load(&config)?;
            println!(
                "`{}` is valid: {} tiers, default policy `{}` with {} rules; policies: {}",
                config.display(),
                c.tiers.len(),
                c.policy.name,
                c.policy.rules.len(),
                c.policies.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            );
            // Valid, but a tier whose key is missing here would be passed over when serving,
            // and one whose model is missing here would stop `serve` at start.
            for t in c.tiers.values() {
                match &t.backend {
                    crate::config::BackendConfig::OpenAi { api_key_env, .. } => {
                        if let Err(why) = crate::upstream::openai::api_key_from_env(api_key_env.as_deref()) {
                            eprintln!("warning: tier `{}` cannot be called in this environment: {why}", t.name);
                        }
                    }
                    crate::config::BackendConfig::Local(s) => {
                        if let Err(why) = crate::local::preflight(&t.name, s) {
                            eprintln!(
                                "warning: the local tier cannot start in this environment (serve would stop): {why}"
                            );
                        }
                    }
                }
            }
            // An existing ledger another program wrote, or an older tiergate, stops `serve`.
            if c.ledger.path.exists() {
                let ledger = &c.ledger.path;
                let opened = rusqlite::Connection::open_with_flags(ledger, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .map_err(|e| format!("ledger `{}`: {e}", ledger.display()));
                if let Err(why) = opened.and_then(|conn| crate::ledger::check_columns(&conn, ledger)) {
                    eprintln!("warning: the ledger cannot be used (serve would stop): {why}");
                }
            }
            // Its files come from provisioning, so their absence is this machine's, not the config's.
            if let Some(cc) = &c.classifier
                && let Err(why) = crate::classifier::preflight(cc)
            {
                eprintln!("warning: the classifier cannot start in this environment (serve would stop): {why}");
            }
            Ok(())
        }
        Command::Policy { command } => policy_command(command).await,
        Command::Report { source, filter, format } => {
            let _tracing = crate::telemetry::init(None)?;
            let paths = source.paths()?;
            let filter = filter.filter(crate::report::now_ms()).map_err(|(e, _)| e)?;
            let report = tokio::task::spawn_blocking(move || crate::report::build(&paths, &filter)).await??;
            print!("{}", crate::report::render::render(&report, format));
            Ok(())
        }
        Command::Keys { store, command } => {
            let path = match store.keys_db {
                Some(p) => p,
                None => Config::load(&store.config)?.auth.keys_db,
            };
            // Only `create` makes a store: a mistyped path to list or revoke is an error, not
            // a new empty store.
            if !matches!(command, KeysCommand::Create { .. }) && !path.exists() {
                anyhow::bail!(
                    "no key store at `{}`; pass the gateway's `--keys-db` or `--config` (`tiergate keys create` makes a store)",
                    path.display()
                );
            }
            let store = crate::auth::KeyStore::open(&path).map_err(anyhow::Error::msg)?;
            keys(&store, command)
        }
        Command::Replay { args, format } => {
            let _tracing = crate::telemetry::init(None)?;
            let done = crate::replay::run(&args, crate::replay::progress_bar()).await?;
            // The summary goes to stderr so `--format json` output stays parseable.
            eprintln!("{}", done.summary());
            print!("{}", crate::report::render::render(&done.report, format));
            Ok(())
        }
    }
}

fn keys(store: &crate::auth::KeyStore, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            name,
            team,
            rpm,
            tpm,
            daily_usd,
            monthly_usd,
        } => {
            for (flag, v) in [("--daily-usd", daily_usd), ("--monthly-usd", monthly_usd)] {
                if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                    anyhow::bail!("`{flag}` must be a number >= 0");
                }
            }
            if let (Some(d), Some(m)) = (daily_usd, monthly_usd)
                && d > m
            {
                eprintln!("note: `--daily-usd {d}` is above `--monthly-usd {m}`: the monthly budget binds first");
            }
            let new = crate::auth::NewKey {
                name,
                team,
                limits: crate::auth::KeyLimits {
                    rpm,
                    tpm,
                    daily_usd,
                    monthly_usd,
                },
            };
            let (key, secret) = store.create(&new).map_err(anyhow::Error::msg)?;
            // The summary goes to stderr, so `$(tiergate keys create …)` captures the secret alone.
            eprintln!(
                "created key `{}` ({}) in `{}`; the secret below is shown once, store it now:",
                key.name,
                key.id,
                store.path().display()
            );
            println!("{secret}");
            Ok(())
        }
        KeysCommand::List => {
            let keys = store.list().map_err(anyhow::Error::msg)?;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(vec![
                    "name",
                    "id",
                    "prefix",
                    "team",
                    "rpm",
                    "tpm",
                    "daily $",
                    "monthly $",
                    "created",
                    "revoked",
                ]);
            for k in keys {
                t.add_row(vec![
                    k.name,
                    k.id,
                    format!("{}…", k.prefix),
                    opt(k.team),
                    opt(k.limits.rpm.map(|v| v.to_string())),
                    opt(k.limits.tpm.map(|v| v.to_string())),
                    opt(k.limits.daily_usd.map(|v| v.to_string())),
                    opt(k.limits.monthly_usd.map(|v| v.to_string())),
                    utc(k.created_ms),
                    opt(k.revoked_ms.map(utc)),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        KeysCommand::Revoke { key } => match store.find(&key).map_err(anyhow::Error::msg)? {
            Some(k) if k.revoked_ms.is_some() => {
                let at = utc(k.revoked_ms.unwrap_or_default());
                println!("key `{}` ({}) was already revoked at {at}", k.name, k.id);
                Ok(())
            }
            _ => revoke(store, &key),
        },
    }
}

fn revoke(store: &crate::auth::KeyStore, key: &str) -> anyhow::Result<()> {
    match store.revoke(key).map_err(anyhow::Error::msg)? {
        Some(k) => {
            println!(
                "revoked key `{}` ({}); the gateway refuses it within `auth.cache_ttl_secs`",
                k.name, k.id
            );
            Ok(())
        }
        None => anyhow::bail!("no key named `{key}` and no key with that id; see `tiergate keys list`"),
    }
}

fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// `--header 'NAME: VALUE'`, as curl takes it.
fn parse_header(s: &str) -> Result<(axum::http::HeaderName, axum::http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not a header; write it as `NAME: VALUE`"))?;
    let name = axum::http::HeaderName::try_from(name.trim())
        .map_err(|_| format!("`{}` is not a valid header name", name.trim()))?;
    let value = axum::http::HeaderValue::try_from(value.trim())
        .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
    Ok((name, value))
}

fn print_explanation(e: &crate::routing::Explanation) {
    match (e.score, e.scorer) {
        (Some(s), Some(by)) => println!("score     {s:.4} ({by})"),
        // Not scored: the tier was named, by the model or by the `x-tiergate-tier` header.
        _ if e.rule == "tier-override" => println!("score     - (the `x-tiergate-tier` header chose the tier)"),
        _ => println!("score     - (the request names a tier's model)"),
    }
    if let Some(p) = &e.policy {
        println!("policy    {p}");
        for t in &e.trace {
            println!(
                "  rule {:<20} -> {:<10} {:<5} {}",
                t.rule,
                t.tier,
                if t.matched { "MATCH" } else { "no" },
                t.why
            );
        }
    }
    for n in &e.notes {
        println!("note      {n}");
    }
    println!("rule      {}", e.rule);
    println!("tier      {} (model `{}`)", e.tier, e.backend_model);
    if let Some(t) = &e.on_saturated {
        println!("spill     {t} (when `{}` is saturated)", e.tier);
    }
    if e.fallback.is_empty() {
        println!("fallback  none");
    } else {
        println!("fallback  {}", e.fallback.join(" -> "));
    }
    if let (Some(t), Some(c)) = (&e.escalate_to, e.min_confidence) {
        println!("escalate  to {t} when the answer's confidence is below {c}");
    }
    println!(
        "cost      ${:.6} estimated for {} prompt + {} output tokens; ${:.6} on the baseline",
        e.estimated_cost_usd, e.prompt_tokens, e.output_tokens_assumed, e.baseline_cost_usd
    );
}

async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { config, files } => {
            let c = Config::load(&config)?;
            let mut failed = 0;
            for f in &files {
                match crate::policy::Policy::load(f, &c.tiers) {
                    Ok(_) => println!("ok {}", f.display()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} policy files are invalid (checked against the tiers of `{}`)",
                    files.len(),
                    config.display()
                );
            }
            Ok(())
        }
        PolicyCommand::Calibrate {
            config,
            target_cloud_share,
            sample,
            policy,
            rule,
            cloud_tier,
            write,
        } => {
            let _tracing = crate::telemetry::init(None)?;
            if !(0.0..=1.0).contains(&target_cloud_share) {
                anyhow::bail!("`--target-cloud-share` = {target_cloud_share} must be in 0..=1, e.g. 0.25");
            }
            let c = Config::load(&config)?;
            let path = policy.unwrap_or_else(|| c.policy.file.clone());
            let p = crate::policy::Policy::load(&path, &c.tiers).map_err(anyhow::Error::msg)?;
            let tier = match cloud_tier {
                Some(t) if c.tiers.contains_key(&t) => t,
                Some(t) => anyhow::bail!("`--cloud-tier {t}` is not a tier of `{}`", config.display()),
                None => c
                    .tiers
                    .values()
                    .max_by(|a, b| crate::routing::sticky::strength(a).total_cmp(&crate::routing::sticky::strength(b)))
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
            };
            let (idx, key) = crate::policy::calibrate::pick_rule(&p, rule.as_deref()).map_err(anyhow::Error::msg)?;
            let facts = sample_facts(&c, &sample).await?;
            let cal = crate::policy::calibrate::calibrate(&p, idx, key, &facts, &tier, target_cloud_share)
                .map_err(anyhow::Error::msg)?;
            if let Some((now, n)) = cal.current {
                println!(
                    "now:        {} = {now} sends {:.1}% ({n} of {}) to `{tier}`",
                    key.name(),
                    100.0 * n as f64 / cal.total.max(1) as f64,
                    cal.total
                );
            }
            println!(
                "calibrated: rule `{}` {} = {} sends {:.1}% ({} of {}) of `{}` to `{tier}` (target {:.1}%)",
                cal.rule,
                key.name(),
                cal.threshold,
                100.0 * cal.share(),
                cal.to_tier,
                cal.total,
                sample.display(),
                100.0 * target_cloud_share
            );
            if write {
                let text = std::fs::read_to_string(&path)?;
                let new = crate::policy::calibrate::rewrite(&text, &cal.rule, key, cal.threshold)
                    .map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
                crate::policy::Policy::parse(&new, &path, &c.tiers).map_err(anyhow::Error::msg)?;
                std::fs::write(&path, new)?;
                println!("wrote {} = {} to `{}`", key.name(), cal.threshold, path.display());
            }
            Ok(())
        }
    }
}

/// Scores every request of a JSONL workload with the configured scorer (the classifier
/// without its length fallback, so no sample is judged by a shed score) and returns what
/// the rules would see.
async fn sample_facts(config: &Config, sample: &std::path::Path) -> anyhow::Result<Vec<crate::policy::Facts>> {
    use crate::routing::Scorer;
    let lines = crate::replay::read_workload(sample)?;
    let mut reqs = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let r = crate::openai::ChatRequest::parse(line.as_bytes())
            .map_err(|e| anyhow::anyhow!("`{}` request {}: {e}", sample.display(), i + 1))?;
        reqs.push(r);
    }
    let length = crate::routing::LengthScorer {
        half_tokens: config.length_half_tokens,
    };
    let classifier = match &config.classifier {
        Some(cc) => {
            crate::onnx::init(config.onnxruntime_library.as_deref()).map_err(anyhow::Error::msg)?;
            Some(std::sync::Arc::new(
                crate::classifier::Classifier::start(
                    cc,
                    crate::routing::LengthScorer {
                        half_tokens: config.length_half_tokens,
                    },
                )
                .map_err(anyhow::Error::msg)?,
            ))
        }
        None => None,
    };
    let mut pending = Vec::with_capacity(reqs.len());
    for r in &reqs {
        let text = r.scored_text();
        let tokens = crate::tokens::estimate(&text);
        let job = match &classifier {
            Some(c) => {
                let c = c.clone();
                let t = text.clone();
                tokio::spawn(async move { c.score_exact(t).await.map(f64::from) })
            }
            None => {
                let s = length.score(&text, tokens).await.value;
                tokio::spawn(async move { Ok(s) })
            }
        };
        pending.push((text, tokens, job));
    }
    let mut out = Vec::with_capacity(reqs.len());
    for (r, (text, tokens, job)) in reqs.iter().zip(pending) {
        let score = job.await?.map_err(anyhow::Error::msg)?;
        out.push(crate::routing::facts(
            r,
            text,
            score,
            tokens,
            &crate::routing::RequestContext::default(),
        ));
    }
    Ok(out)
}

async fn score_file(
    config: &std::path::Path,
    head: Option<PathBuf>,
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let config = Config::load(config)?;
    let Some(mut cc) = config.classifier.clone() else {
        anyhow::bail!(
            "`{}` uses no classifier: set `routing.scorer = \"classifier\"`",
            config.file.display()
        );
    };
    if let Some(h) = head {
        anyhow::ensure!(h.is_file(), "--head `{}`: no such file", h.display());
        cc.spec = h.with_extension("json");
        cc.head = h;
    }
    // Writing the scores over the prompts would lose them.
    if let (Ok(i), Ok(o)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        anyhow::ensure!(
            i != o,
            "--output `{}` is the input file; write the scores elsewhere",
            output.display()
        );
    }
    crate::onnx::init(config.onnxruntime_library.as_deref()).map_err(anyhow::Error::msg)?;
    let classifier = std::sync::Arc::new(
        crate::classifier::Classifier::start(
            &cc,
            crate::routing::LengthScorer {
                half_tokens: config.length_half_tokens,
            },
        )
        .map_err(anyhow::Error::msg)?,
    );
    let reader =
        std::io::BufReader::new(std::fs::File::open(input).map_err(|e| anyhow::anyhow!("`{}`: {e}", input.display()))?);
    let mut items = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("`{}` line {}: {e}", input.display(), n + 1))?;
        let text = v["text"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("`{}` line {}: no string `text`", input.display(), n + 1))?;
        items.push((v["id"].clone(), text.to_owned()));
    }
    // Submitted all at once so the workers batch them as they would under load.
    let mut pending = Vec::with_capacity(items.len());
    for (id, text) in items {
        let c = classifier.clone();
        pending.push((id, tokio::spawn(async move { c.score_exact(text).await })));
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(output).map_err(|e| anyhow::anyhow!("--output `{}`: {e}", output.display()))?,
    );
    for (id, task) in pending {
        let score = task.await?.map_err(anyhow::Error::msg)?;
        writeln!(out, "{}", serde_json::json!({"id": id, "score": score}))?;
    }
    out.flush()?;
    Ok(())
}

/// Takes `<ledger>.lock` for as long as the returned file is open, so that a second gateway
/// pointed at the same ledger stops at start instead of sharing it (budgets rebuilt from it
/// and the report would then mix two gateways' rows). The kernel releases the lock when
/// the process ends however it ends.
fn lock_ledger(ledger: &std::path::Path) -> anyhow::Result<std::fs::File> {
    // A symbolic link to a ledger in use is that ledger: lock the file it leads to.
    let resolved = std::fs::canonicalize(ledger).ok();
    let mut name = resolved.as_deref().unwrap_or(ledger).as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", dir.display()))?;
    }
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open `{}`: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "ledger `{}` is in use by another running tiergate (it holds `{}`); give each gateway its own `ledger.path`",
                ledger.display(),
                path.display()
            );
        }
    }
    Ok(file)
}

/// The next delivery of `s`; never, when it could not be registered.
#[cfg(unix)]
async fn next_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGTERM or Ctrl-C, each time one arrives: the first starts a graceful shutdown, the next
/// ends its grace period at once.
fn shutdown_signals() -> impl futures::Stream<Item = ()> + Send + 'static {
    async_stream::stream! {
        // Registered once, so that a signal arriving between two waits is not lost.
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        #[cfg(unix)]
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        loop {
            #[cfg(unix)]
            {
                tokio::select! {
                    () = next_signal(&mut term) => {}
                    () = next_signal(&mut int) => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            yield ();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_header;

    #[test]
    fn header_options_parse_like_curl_and_say_what_is_wrong() {
        let (name, value) = parse_header("X-Priority:  low ").expect("valid");
        assert_eq!((name.as_str(), value.to_str().ok()), ("x-priority", Some("low")));
        let (_, value) = parse_header("x-when: 12:30").expect("valid");
        assert_eq!(value.to_str().ok(), Some("12:30"), "split at the first colon");
        assert!(parse_header("x-priority low").is_err_and(|e| e.contains("NAME: VALUE")));
        assert!(parse_header("bad name: x").is_err_and(|e| e.contains("not a valid header name")));
    }
}
