//! Hot reload: watches the config and policy files (by modification time) and SIGHUP, and
//! swaps in a new [`Runtime`] only when everything in it validates. Requests already
//! running keep the runtime they loaded; a failed reload leaves the old one serving.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{AppState, Runtime};

/// The outcome of the last reload, and how many succeeded or failed.
#[derive(Debug, Default)]
pub struct ReloadState {
    last: Mutex<Option<Outcome>>,
    pub applied: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// Why the new config or policy was rejected (names the file, key and line).
    pub error: Option<String>,
    /// When it was tried (RFC 3339, UTC).
    pub at: String,
}

impl ReloadState {
    pub fn last(&self) -> Option<Outcome> {
        self.last.lock().map(|l| l.clone()).unwrap_or(None)
    }

    fn set(&self, ok: bool, error: Option<String>) {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        if let Ok(mut l) = self.last.lock() {
            *l = Some(Outcome { ok, error, at });
        }
        let counter = if ok { &self.applied } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Re-reads the config file the running config came from, with its policies, and swaps it
/// in with one store. Blocking: it may load models (only for tiers whose config changed).
pub fn reload(state: &AppState) -> Result<(), String> {
    let old = state.runtime.load_full();
    let built = Config::load(&old.config.file)
        .map_err(|e| e.to_string())
        .and_then(|mut config| {
            // `--listen`, the ledger, the connections' header timeout, the key cache, the
            // trace exporter and ONNX Runtime are bound at start; a change to them needs a
            // restart.
            if config.listen_in_file != old.config.listen_in_file {
                tracing::warn!(
                    listen = %config.listen_in_file,
                    serving = %old.config.listen,
                    "listen changed; the new address is used after a restart"
                );
            }
            config.listen = old.config.listen;
            let (new, was) = (&config, &old.config);
            for (changed, key) in [
                (new.ledger.path != was.ledger.path, "ledger.path"),
                (new.ledger.queue_capacity != was.ledger.queue_capacity, "ledger.queue_capacity"),
                (new.ledger.batch_size != was.ledger.batch_size, "ledger.batch_size"),
                (new.limits.header_timeout != was.limits.header_timeout, "limits.header_timeout_secs"),
                (new.auth.cache_ttl != was.auth.cache_ttl, "auth.cache_ttl_secs"),
                (new.telemetry.otlp_endpoint != was.telemetry.otlp_endpoint, "telemetry.otlp_endpoint"),
                // ONNX Runtime is loaded once per process.
                (new.onnxruntime_library != was.onnxruntime_library, "onnxruntime.library"),
            ] {
                if changed {
                    tracing::warn!("{key} changed; the new value is used after a restart");
                }
            }
            let auth_turned_off = old.config.auth.enabled && !config.auth.enabled;
            let rt = Runtime::rebuild(config, Some(&old))?;
            // Auth turned on, or another key store: open it now, or refuse the reload.
            state.auth.follow(&rt.config.auth)?;
            if auth_turned_off {
                tracing::warn!(
                    "AUTH IS OFF after this reload (`[auth] enabled = false`): anyone who can reach the gateway can use every tier, paid ones included, without a key, rate limit or budget"
                );
            }
            Ok(rt)
        });
    match built {
        Ok(rt) => {
            let policies: Vec<&str> = rt.config.policies.keys().map(String::as_str).collect();
            tracing::info!(config = %rt.config.file.display(), policies = ?policies, "reloaded configuration");
            state.runtime.store(Arc::new(rt));
            state.reload.set(true, None);
            Ok(())
        }
        Err(e) => {
            tracing::error!("reload rejected, the previous configuration stays active: {e}");
            state.reload.set(false, Some(e.clone()));
            Err(e)
        }
    }
}

type Stamps = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

/// Each file's modification time and a hash of its content: an edit that keeps the size
/// and the time (a tool that restores mtimes, a coarse clock) is still seen. The files are
/// a config and its policies, a few kilobytes read once per poll. A watched directory
/// (`policies_dir`) has its time and size: a file added or removed changes its time.
fn stamps(files: &[PathBuf]) -> Stamps {
    use std::hash::{Hash, Hasher};
    files
        .iter()
        .map(|f| {
            let stamp = std::fs::metadata(f).ok().and_then(|m| {
                let content = if m.is_file() {
                    let mut h = std::hash::DefaultHasher::new();
                    std::fs::read(f).ok()?.hash(&mut h);
                    h.finish()
                } else {
                    m.len()
                };
                Some((m.modified().ok()?, content))
            });
            (f.clone(), stamp)
        })
        .collect()
}

/// Reloads when a watched file changes (checked every `reload.poll_secs`) or on SIGHUP,
/// until `stop` is cancelled.
pub async fn watch(state: Arc<AppState>, stop: CancellationToken) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let mut hup: Option<()> = None;
    let mut seen = stamps(&state.runtime.load().config.files());
    loop {
        let poll = state.runtime.load().config.reload_poll;
        let tick = async {
            match poll {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let signalled = async {
            match &mut hup {
                #[cfg(unix)]
                Some(s) => {
                    s.recv().await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        let files = state.runtime.load().config.files();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tick => {
                if stamps(&files) == seen {
                    continue;
                }
            }
            () = signalled => tracing::info!("SIGHUP: reloading configuration"),
        }
        let st = state.clone();
        let _ = tokio::task::spawn_blocking(move || reload(&st)).await;
        seen = stamps(&state.runtime.load().config.files());
    }
}

#[cfg(test)]
mod tests {
    use super::stamps;

    #[test]
    fn an_edit_that_keeps_size_and_mtime_is_still_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("policy.toml");
        std::fs::write(&f, "score_below = 0.5\n").expect("write");
        let mtime = std::fs::metadata(&f).expect("meta").modified().expect("mtime");
        let before = stamps(std::slice::from_ref(&f));
        std::fs::write(&f, "score_below = 0.1\n").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&f)
            .expect("open")
            .set_modified(mtime)
            .expect("restore mtime");
        assert_eq!(std::fs::metadata(&f).expect("meta").modified().expect("mtime"), mtime);
        assert_ne!(stamps(std::slice::from_ref(&f)), before);
        assert_eq!(stamps(std::slice::from_ref(&f)), stamps(std::slice::from_ref(&f)));
    }
}
