//! The learned difficulty scorer: a sentence encoder and a small head through ONNX Runtime
//! on dedicated threads, fed by a bounded queue, with micro-batching and a cache of recent
//! scores. When the queue is full or the model is late, it answers with the length scorer
//! and says so (`scorer = "length-fallback"`), so scoring never stalls a request.

pub mod features;

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

pub use self::features::{Featurizer, Spec};
use crate::routing::{LengthScorer, Score, Scorer};

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierConfig {
    /// Directory with the encoder's `model.onnx` and `tokenizer.json`.
    pub encoder_dir: PathBuf,
    /// The trained head (`router-model/head.onnx`) and its spec (`head.json`).
    pub head: PathBuf,
    pub spec: PathBuf,
    pub workers: usize,
    pub threads_per_worker: usize,
    /// Let ONNX Runtime's threads spin between runs (see `Featurizer::load`).
    pub spinning: bool,
    /// Run the float `model.onnx` even where the spec's integer graph would be exact.
    pub float_encoder: bool,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub cache_capacity: u64,
    /// How long a request waits for its score before falling back to the length scorer.
    pub timeout: Duration,
}

struct Job {
    text: String,
    reply: oneshot::Sender<Result<f32, String>>,
}

/// Counters for `/readyz` and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub scored: AtomicU64,
    pub cache_hits: AtomicU64,
    pub shed: AtomicU64,
    pub timeouts: AtomicU64,
    pub errors: AtomicU64,
    /// Recent model time per scored text, in µs (moving average), for shedding early.
    pub per_text_us: AtomicU64,
    /// Jobs queued or in a worker's current batch.
    pub in_flight: AtomicU64,
}

/// Whether a job joining `depth` others (queued or being scored) would wait past `timeout`
/// for its score: then the request is scored by length at once, instead of waiting `timeout` first to
/// fall back anyway (under overload every request would pay the whole time-out).
fn hopeless(depth: u64, per_text_us: u64, workers: usize, timeout: Duration) -> bool {
    let wait_us = (depth + 1).saturating_mul(per_text_us) / workers.max(1) as u64;
    depth > 0 && wait_us > timeout.as_micros() as u64
}

pub struct Classifier {
    tx: mpsc::Sender<Job>,
    cache: moka::sync::Cache<u64, f32>,
    fallback: LengthScorer,
    timeout: Duration,
    workers: usize,
    /// Which encoder graph runs: `integer` (the spec's `encoder_graph`) or `float` (`model.onnx`).
    pub encoder: &'static str,
    /// `file_stamps` when it was loaded: a reload reuses it only while they hold.
    pub stamps: Vec<Stamp>,
    pub stats: Arc<Stats>,
}

impl Classifier {
    /// Loads one featurizer per worker (failing fast if the files are missing or broken)
    /// and starts the workers.
    pub fn start(cfg: &ClassifierConfig, fallback: LengthScorer) -> Result<Classifier, String> {
        let spec = load_spec(cfg)?;
        let stamps = stamp(&files(cfg, spec.encoder_graph_path.as_deref()));
        features::check_encoder(&cfg.encoder_dir, &spec)?;
        let encoder = if spec.graph_to_run().is_some() {
            "integer"
        } else {
            "float"
        };
        let (tx, rx) = mpsc::channel::<Job>(cfg.queue_capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(Stats::default());
        for i in 0..cfg.workers.max(1) {
            let f = Featurizer::load(
                &cfg.encoder_dir,
                &cfg.head,
                spec.clone(),
                cfg.threads_per_worker.max(1),
                cfg.spinning,
            )?;
            let rx = rx.clone();
            let stats = stats.clone();
            let max_batch = cfg.max_batch.max(1);
            std::thread::Builder::new()
                .name(format!("tiergate-classifier-{i}"))
                .spawn(move || worker(f, &rx, max_batch, &stats))
                .map_err(|e| format!("cannot start classifier worker: {e}"))?;
        }
        Ok(Classifier {
            tx,
            cache: moka::sync::Cache::new(cfg.cache_capacity),
            fallback,
            timeout: cfg.timeout,
            workers: cfg.workers.max(1),
            encoder,
            stamps,
            stats,
        })
    }

    /// Scores through the model, bypassing cache and time-out: for evaluation, where every
    /// text must be scored by the model.
    pub async fn score_exact(&self, text: String) -> Result<f32, String> {
        let (reply, rx) = oneshot::channel();
        // Counted like any job: the worker takes every job it dequeues off `in_flight`.
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Job { text, reply }).await.is_err() {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err("classifier stopped".to_owned());
        }
        rx.await.map_err(|_| "classifier stopped".to_owned())?
    }
}

/// The spec, without its encoder graph when the config asks for the float `model.onnx`.
fn load_spec(cfg: &ClassifierConfig) -> Result<Spec, String> {
    let mut spec = Spec::load(&cfg.spec)?;
    if cfg.float_encoder {
        spec.encoder_graph_path = None;
    }
    Ok(spec)
}

/// A file's modification time and size, `None` when it cannot be read.
pub type Stamp = Option<(std::time::SystemTime, u64)>;

/// The files a classifier is built from (head, spec, the spec's encoder graph, the encoder's
/// `model.onnx` and tokenizer), stamped: a head retrained in place, or a re-provisioned
/// encoder, changes them, and the next reload loads the classifier again.
pub fn file_stamps(cfg: &ClassifierConfig) -> Vec<Stamp> {
    let spec = load_spec(cfg).ok();
    stamp(&files(cfg, spec.as_ref().and_then(|s| s.encoder_graph_path.as_deref())))
}

fn files(cfg: &ClassifierConfig, graph: Option<&std::path::Path>) -> Vec<PathBuf> {
    let mut files = vec![
        cfg.head.clone(),
        cfg.spec.clone(),
        cfg.encoder_dir.join("model.onnx"),
        cfg.encoder_dir.join("tokenizer.json"),
    ];
    files.extend(graph.map(std::path::Path::to_path_buf));
    files
}

fn stamp(files: &[PathBuf]) -> Vec<Stamp> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// What `Classifier::start` needs besides ONNX Runtime, checked without loading a model
/// (for `tiergate check`): the spec and the files it names, the head, the tokenizer and the
/// encoder the head was trained on.
pub fn preflight(cfg: &ClassifierConfig) -> Result<(), String> {
    let spec = load_spec(cfg)?;
    if !cfg.head.is_file() {
        return Err(format!("the head `{}` is not a file", cfg.head.display()));
    }
    for name in ["tokenizer.json", "model.onnx"] {
        let f = cfg.encoder_dir.join(name);
        if !f.is_file() {
            return Err(format!(
                "`{}` is not a file: run `python3 scripts/provision.py` (or set routing.classifier.encoder_dir)",
                f.display()
            ));
        }
    }
    if let Some(graph) = spec.graph_to_run()
        && !graph.is_file()
    {
        return Err(format!(
            "the spec's encoder_graph `{}` is not a file: restore it, or set routing.classifier.encoder = \"float\"",
            graph.display()
        ));
    }
    features::check_encoder(&cfg.encoder_dir, &spec)
}

fn cache_key(text: &str) -> u64 {
    // SipHash with fixed keys: stable within the process, which is all the cache needs.
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl Scorer for Classifier {
    fn score<'a>(&'a self, text: &'a str, prompt_tokens: u64) -> BoxFuture<'a, Score> {
        Box::pin(async move {
            let fallback = || Score {
                value: self.fallback.score_tokens(prompt_tokens),
                scorer: "length-fallback",
            };
            let key = cache_key(text);
            if let Some(v) = self.cache.get(&key) {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Score {
                    value: f64::from(v),
                    scorer: "classifier",
                };
            }
            let depth = self.stats.in_flight.load(Ordering::Relaxed);
            let per_text_us = self.stats.per_text_us.load(Ordering::Relaxed);
            if hopeless(depth, per_text_us, self.workers, self.timeout) {
                self.stats.shed.fetch_add(1, Ordering::Relaxed);
                return fallback();
            }
            let (reply, rx) = oneshot::channel();
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            if self
                .tx
                .try_send(Job {
                    text: text.to_owned(),
                    reply,
                })
                .is_err()
            {
                self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.stats.shed.fetch_add(1, Ordering::Relaxed);
                return fallback();
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(Ok(v))) => {
                    self.stats.scored.fetch_add(1, Ordering::Relaxed);
                    self.cache.insert(key, v);
                    Score {
                        value: f64::from(v),
                        scorer: "classifier",
                    }
                }
                Ok(Ok(Err(e))) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "classifier failed; using the length scorer");
                    fallback()
                }
                Ok(Err(_)) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    fallback()
                }
                Err(_) => {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    fallback()
                }
            }
        })
    }
}

fn worker(mut f: Featurizer, rx: &Mutex<mpsc::Receiver<Job>>, max_batch: usize, stats: &Stats) {
    loop {
        let mut jobs = Vec::with_capacity(max_batch);
        {
            let Ok(mut rx) = rx.lock() else { return };
            let Some(first) = rx.blocking_recv() else {
                return;
            };
            jobs.push(first);
            while jobs.len() < max_batch {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        let taken = jobs.len() as u64;
        // Requests whose caller already gave up are not worth a model pass.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            stats.in_flight.fetch_sub(taken, Ordering::Relaxed);
            continue;
        }
        let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        let started = std::time::Instant::now();
        let scored = f.score(&texts);
        let us = started.elapsed().as_micros() as u64 / texts.len() as u64;
        let old = stats.per_text_us.load(Ordering::Relaxed);
        let avg = if old == 0 { us } else { (old * 7 + us) / 8 };
        stats.per_text_us.store(avg, Ordering::Relaxed);
        match scored {
            Ok(scores) => {
                for (j, s) in jobs.into_iter().zip(scores) {
                    let _ = j.reply.send(Ok(s));
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
        }
        stats.in_flight.fetch_sub(taken, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_only_when_the_queue_cannot_be_served_in_time() {
        let t = Duration::from_millis(50);
        // An empty queue always waits: the job is next.
        assert!(!hopeless(0, 1_000_000, 1, t));
        // 4 ahead + this one at 10 ms each = 50 ms: just in time.
        assert!(!hopeless(4, 10_000, 1, t));
        assert!(hopeless(5, 10_000, 1, t));
        // Two workers share the queue.
        assert!(!hopeless(9, 10_000, 2, t));
        assert!(hopeless(10, 10_000, 2, t));
        // Before any score was timed nothing is shed.
        assert!(!hopeless(60, 0, 1, t));
    }
}
