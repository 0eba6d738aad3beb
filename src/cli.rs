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
    /// Run the gateway.
    Serve {
        /// Gateway configuration (TOML).
        #[arg(
            long,
            short,
            env = "TIERGATE_CONFIG",
            default_value = "examples/tiergate.toml"
        )]
        config: PathBuf,
        /// Listen address; overrides `listen` in the config.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration and its policy without starting the gateway.
    Check {
        #[arg(
            long,
            short,
            env = "TIERGATE_CONFIG",
            default_value = "examples/tiergate.toml"
        )]
        config: PathBuf,
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

/// Which ledger files to read.
#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    /// Ledger file to read; repeat it to aggregate the ledgers of several replicas into one
    /// report. Default: `ledger.path` of `--config`.
    #[arg(long = "ledger", value_name = "FILE")]
    pub ledgers: Vec<PathBuf>,
    /// Gateway configuration whose `ledger.path` is read when no `--ledger` is given.
    #[arg(
        long,
        short,
        env = "TIERGATE_CONFIG",
        default_value = "examples/tiergate.toml"
    )]
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
                onnxruntime = %state.onnxruntime_version,
                ledger = %state.ledger.path().display(),
                "tiergate ready"
            );
            crate::serve(listener, state.clone(), shutdown_signal()).await?;
            let ledger = state.ledger.clone();
            ledger.shutdown().await;
            tracing.shutdown().await;
            tracing::info!("stopped; ledger and traces flushed");
            Ok(())
        }
        Command::Check { config } => {
            let _tracing = crate::telemetry::init(None)?;
            let c = Config::load(&config)?;
            println!(
                "`{}` is valid: {} tiers, policy `{}` with {} rules",
                config.display(),
                c.tiers.len(),
                c.policy.name,
                c.policy.rules.len()
            );
            Ok(())
        }
        Command::Report {
            source,
            filter,
            format,
        } => {
            let _tracing = crate::telemetry::init(None)?;
            let paths = source.paths()?;
            let filter = filter.filter(crate::report::now_ms())?;
            let report = tokio::task::spawn_blocking(move || crate::report::build(&paths, &filter))
                .await??;
            print!("{}", crate::report::render::render(&report, format));
            Ok(())
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

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
