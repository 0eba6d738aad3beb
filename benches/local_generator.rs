//! Benchmark of the local tier's generation engine on a provisioned model: prefill latency
//! of a ~50-token chat prompt, time to first token, decode tok/s over 64 tokens, RSS, and
//! throughput with 1, 2, 4, 8 concurrent requests. `benches/local_generator.sh` runs it
//! side by side with the Python onnxruntime loop on the same model file.
//!
//!   cargo bench --bench local_generator -- MODEL_DIR [--repeat N] [--threads N] [--no-spin] [--raw]
//!
//! `--raw` times a bare greedy loop over the session instead (no engine thread, sampler,
//! detokenizer), to show what the engine costs on top.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiergate::local::engine::{Engine, EngineSettings, Event, Finish, Job};
use tiergate::local::model::{Graph, KvCache, ModelFiles, SessionSettings};
use tiergate::local::sampling::{SamplingParams, argmax};
use tiergate::local::template::{ChatTemplate, TurnView};

/// The prompt of `scripts/local_model/python_greedy.py --bench` (kept identical, so both
/// sides run the same tokens).
const BENCH_PROMPT: &str = "Summarise in one sentence: the report is due on Friday and the meeting moved to room 4.";
const NEW_TOKENS: usize = 64;

struct Args {
    model_dir: PathBuf,
    repeat: usize,
    threads: usize,
    spinning: bool,
    raw: bool,
}

fn args() -> Args {
    let mut a = Args {
        model_dir: tiergate::cache::cache_dir().join("models/smollm2-135m-instruct"),
        repeat: 3,
        threads: 2,
        spinning: true,
        raw: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--repeat" => a.repeat = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--threads" => a.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--no-spin" => a.spinning = false,
            "--raw" => a.raw = true,
            // cargo bench passes `--bench`.
            "--bench" => {}
            other => a.model_dir = PathBuf::from(other),
        }
    }
    a
}

/// Runs one job; returns the summary and the time from submission to the first text.
fn run(engine: &Engine, job: Job) -> (Finish, Option<Duration>) {
    let t0 = Instant::now();
    let mut rx = engine.submit(job).expect("engine has room");
    let mut ttft = None;
    loop {
        match rx.blocking_recv().expect("engine answers") {
            Event::Text(_) => {
                ttft.get_or_insert_with(|| t0.elapsed());
            }
            Event::Done(f) => return (f, ttft),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

fn job(prompt: &[u32], max_tokens: usize) -> Job {
    Job {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::GREEDY,
        stop: Vec::new(),
        // Like the Python loop's `ignore_eos`: always 64 decode steps.
        ignore_eos: true,
    }
}

fn raw_loop(files: &ModelFiles, prompt: &[u32], a: &Args) {
    let settings = SessionSettings {
        threads: a.threads,
        spinning: a.spinning,
    };
    let mut g = Graph::load(files, settings).expect("graph loads");
    for r in 0..=a.repeat {
        let mut kv = KvCache::default();
        let mut logits = Vec::new();
        let t0 = Instant::now();
        g.step(&mut kv, prompt, &mut logits).expect("prefill");
        let mut token = argmax(&logits).0 as u32;
        let t1 = Instant::now();
        for _ in 0..NEW_TOKENS {
            g.step(&mut kv, &[token], &mut logits).expect("decode");
            token = argmax(&logits).0 as u32;
        }
        if r > 0 {
            println!(
                "raw prefill_ms={:.1} decode_tok_s={:.2}",
                (t1 - t0).as_secs_f64() * 1000.0,
                NEW_TOKENS as f64 / t1.elapsed().as_secs_f64()
            );
        }
    }
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let a = args();
    tiergate::onnx::init(None).expect("ONNX Runtime (run `python3 scripts/provision.py`)");
    let t_load = Instant::now();
    let files = Arc::new(ModelFiles::load(&a.model_dir).expect("model loads"));
    let template = ChatTemplate::new(&files.chat_template, &files.bos_token, &files.eos_token).expect("template");
    let text = template
        .render(&[TurnView {
            role: "user".into(),
            content: BENCH_PROMPT.into(),
        }])
        .expect("renders");
    let prompt = files
        .tokenizer
        .encode(text.as_str(), false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    let engine = Engine::start(
        files.clone(),
        EngineSettings {
            session: SessionSettings {
                threads: a.threads,
                spinning: a.spinning,
            },
            max_concurrent: 8,
            queue_capacity: 8,
        },
    )
    .expect("engine starts");
    println!(
        "# tiergate engine: {} loaded in {:.2}s, intra_op_threads={}, spinning={}",
        a.model_dir.display(),
        t_load.elapsed().as_secs_f64(),
        a.threads,
        a.spinning
    );

    // NEW_TOKENS + 1 generated tokens: the first comes from the prefill step, the other 64
    // from decode steps (as in the Python loop).
    let mut prefills = Vec::new();
    let mut ttfts = Vec::new();
    let mut decodes = Vec::new();
    let mut out_ids = Vec::new();
    for r in 0..=a.repeat {
        let (f, ttft) = run(&engine, job(&prompt, NEW_TOKENS + 1));
        if r == 0 {
            continue; // warm-up
        }
        prefills.push(f.prefill.as_secs_f64() * 1000.0);
        ttfts.push(ttft.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0));
        decodes.push(NEW_TOKENS as f64 / f.decode.as_secs_f64());
        out_ids = f.output_ids;
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mut sorted = decodes.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    println!(
        "prompt_tokens={} prefill_ms={:.1} ttft_ms={:.1} decode_tok_s={:.2} ({NEW_TOKENS} tokens) rss_mib={} peak_rss_mib={}",
        prompt.len(),
        best(&prefills),
        best(&ttfts),
        median,
        status_kib("VmRSS:") / 1024,
        status_kib("VmHWM:") / 1024,
    );
    let round = |v: &[f64]| v.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>();
    println!(
        "  prefill runs {:?}, ttft runs {:?}, decode runs {:?}",
        round(&prefills),
        round(&ttfts),
        round(&decodes)
    );
    let text = files.tokenizer.decode(&out_ids, true).unwrap_or_default();
    println!("  text: {:?}", text.chars().take(200).collect::<String>());

    if a.raw {
        // The same steps without the engine (no thread hop, detokenizer, sampler or
        // confidence): what the engine adds on top of the session.
        drop(engine);
        raw_loop(&files, &prompt, &a);
        return;
    }
    // Throughput with several requests at once (interleaved on one session).
    for n in [1usize, 2, 4, 8] {
        let t0 = Instant::now();
        let rxs: Vec<_> = (0..n)
            .map(|_| engine.submit(job(&prompt, NEW_TOKENS)).expect("room"))
            .collect();
        let mut tokens = 0;
        for mut rx in rxs {
            while let Some(ev) = rx.blocking_recv() {
                if let Event::Done(f) = ev {
                    tokens += f.completion_tokens;
                    break;
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "concurrent={n} generated={tokens} wall_s={secs:.2} throughput_tok_s={:.1}",
            tokens as f64 / secs
        );
    }
}
