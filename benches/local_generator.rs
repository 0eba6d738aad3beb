//! Benchmark of the local tier's generation engine on a provisioned model: prefill latency
//! of a ~50-token chat prompt, time to first token, decode tok/s over 64 tokens, RSS, and
//! throughput with 1, 2, 4, 8 concurrent requests. `benches/local_generator.sh` runs it
//! side by side with the Python onnxruntime loop on the same model file.
//!
//!   cargo bench --bench local_generator -- MODEL_DIR [--repeat N] [--threads N] [--no-spin]
//!       [--draft N] [--no-head] [--prompts FILE [--serve]] [--raw] [--profile]
//!
//! `--draft N` sets the prompt-lookup draft length of the speculative runs (default 8;
//! 0 leaves only plain runs); `--no-head` leaves the model's draft head unloaded.
//! `--prompts FILE` (JSON lines with
//! `name`, `messages`, `max_tokens`, `ignore_eos`, as `benches/local_prompts.jsonl`) runs
//! each prompt plain, with prompt lookup alone (`lookup`, when the model has a draft head)
//! and speculative as served (`spec`: lookup, and the draft head's guesses where lookup has
//! none), and prints one `RESULT` line each, like
//! `python_greedy.py --prompts`; with `--serve` it reads prompt names from stdin instead
//! (one per line, answered by a `DONE` line), so that `benches/local_generator_paired.py`
//! can alternate the two sides prompt by prompt. `--raw` times a bare greedy loop over the
//! session instead (no engine thread, sampler, detokenizer), to show what the engine costs
//! on top.
//! `--profile` splits a decode step: forward pass, picking the token, detokenizing, and
//! the cost of verifying 1 + k tokens in one pass and of rolling the cache back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiergate::local::draft::DraftHead;
use tiergate::local::engine::{Engine, EngineSettings, Event, Finish, Job};
use tiergate::local::lookup::SUGGESTED_DRAFT_TOKENS;
use tiergate::local::model::{Graph, KvCache, ModelFiles, SessionSettings};
use tiergate::local::sampling::{Sampler, SamplingParams, argmax};
use tiergate::local::template::{ChatTemplate, TurnView};
use tiergate::local::text::Detokenizer;

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
    profile: bool,
    draft: usize,
    head: bool,
    prompts: Option<PathBuf>,
    serve: bool,
}

fn args() -> Args {
    let mut a = Args {
        model_dir: tiergate::cache::cache_dir().join("models/smollm2-135m-instruct"),
        repeat: 3,
        threads: 2,
        spinning: true,
        raw: false,
        profile: false,
        draft: SUGGESTED_DRAFT_TOKENS,
        head: true,
        prompts: None,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--repeat" => a.repeat = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--threads" => a.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--no-spin" => a.spinning = false,
            "--raw" => a.raw = true,
            "--profile" => a.profile = true,
            "--draft" => a.draft = it.next().and_then(|v| v.parse().ok()).unwrap_or(SUGGESTED_DRAFT_TOKENS),
            "--no-head" => a.head = false,
            "--prompts" => a.prompts = it.next().map(PathBuf::from),
            "--serve" => a.serve = true,
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
            Event::Text { .. } => {
                ttft.get_or_insert_with(|| t0.elapsed());
            }
            Event::Prefix(_) => {}
            Event::Done(f) => return (f, ttft),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

fn job(prompt: &[u32], max_tokens: usize, draft_tokens: usize) -> Job {
    Job {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::GREEDY,
        stop: Vec::new(),
        // Like the Python loop's `ignore_eos`: always 64 decode steps.
        ignore_eos: true,
        draft_tokens,
        draft_head: true,
        assess_after: 0,
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
        let mut token = 0;
        let t0 = Instant::now();
        g.step(
            &mut kv,
            prompt,
            1,
            |row| {
                token = argmax(row).0 as u32;
                false
            },
            None,
        )
        .expect("prefill");
        let t1 = Instant::now();
        for _ in 0..NEW_TOKENS {
            let input = [token];
            g.step(
                &mut kv,
                &input,
                1,
                |row| {
                    token = argmax(row).0 as u32;
                    false
                },
                None,
            )
            .expect("decode");
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

fn encode(files: &ModelFiles, template: &ChatTemplate, turns: &[TurnView]) -> Vec<u32> {
    let text = template.render(turns).expect("renders");
    files
        .tokenizer
        .encode(text.as_str(), false)
        .expect("encodes")
        .get_ids()
        .to_vec()
}

struct BenchPrompt {
    name: String,
    turns: Vec<TurnView>,
    max_tokens: usize,
    ignore_eos: bool,
}

fn read_prompts(path: &std::path::Path) -> Vec<BenchPrompt> {
    let text = std::fs::read_to_string(path).expect("prompts file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let turns = v["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| TurnView {
                    role: m["role"].as_str().unwrap_or_default().to_owned(),
                    content: m["content"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
            BenchPrompt {
                name: v["name"].as_str().expect("name").to_owned(),
                turns,
                max_tokens: v["max_tokens"].as_u64().unwrap_or(128) as usize,
                ignore_eos: v["ignore_eos"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

/// Same formula as `python_greedy.py`, so both sides' outputs can be compared at a glance.
fn checksum(ids: &[u32]) -> u64 {
    ids.iter()
        .enumerate()
        .map(|(i, &t)| (i as u64 + 1) * u64::from(t))
        .sum()
}

/// Where a decode step's time goes, on the bench prompt.
fn profile(files: &ModelFiles, prompt: &[u32], a: &Args) {
    let settings = SessionSettings {
        threads: a.threads,
        spinning: a.spinning,
    };
    let mut g = Graph::load(files, settings).expect("graph loads");
    let allowed = files.real_vocab.min(g.vocab);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut kv = KvCache::default();
    let mut token = 0;
    let mut row0 = Vec::new();
    g.step(
        &mut kv,
        prompt,
        1,
        |row| {
            token = argmax(row).0 as u32;
            row0 = row.to_vec();
            false
        },
        None,
    )
    .expect("prefill");
    // Plain steps: the forward pass (with feeding and reading outputs), then the product's
    // pick (argmax + log-softmax) on the same row, then the detokenizer.
    let mut sampler = Sampler::new(SamplingParams::GREEDY);
    let mut detok = Detokenizer::default();
    let (mut fwd, mut pick, mut text) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    // The draft head's guess after each step, with the engine's thread count and with one.
    let mut heads: Vec<(usize, DraftHead, Duration)> = match &files.draft_head {
        Some(path) if g.has_hidden => [a.threads, 1]
            .into_iter()
            .map(|threads| {
                let s = SessionSettings { threads, ..settings };
                (
                    threads,
                    DraftHead::load(path, s).expect("draft head loads"),
                    Duration::ZERO,
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let (mut hidden, mut next) = (Vec::new(), Vec::new());
    let steps = 48;
    for _ in 0..steps {
        let t0 = Instant::now();
        let input = [token];
        let mut picked = None;
        g.step(
            &mut kv,
            &input,
            1,
            |row| {
                let t = Instant::now();
                picked = Some(sampler.pick(row, allowed));
                pick += t.elapsed();
                false
            },
            (!heads.is_empty()).then_some(&mut hidden),
        )
        .expect("decode");
        fwd += t0.elapsed();
        token = picked.expect("picked").token;
        let t = Instant::now();
        let _ = detok.push(&files.tokenizer, token);
        text += t.elapsed();
        for (_, head, spent) in heads.iter_mut() {
            let t = Instant::now();
            head.guess(&hidden, token, &mut next).expect("guess");
            *spent += t.elapsed();
        }
    }
    for (threads, _, spent) in &heads {
        println!(
            "profile: draft head guess ({threads} intra-op threads) {:.3} ms a step",
            ms(*spent) / steps as f64
        );
    }
    fwd -= pick;
    let per = |d: Duration| ms(d) / steps as f64;
    println!(
        "profile: vocab={} cache={} tokens; per decode step: forward {:.2} ms, pick (argmax + log-softmax) {:.3} ms, detokenize {:.3} ms",
        g.vocab,
        kv.len,
        per(fwd),
        per(pick),
        per(text)
    );
    // Verifying 1 + k tokens in one pass, and rolling back the k drafted positions.
    for k in [0usize, 1, 2, 4, 8] {
        let reps = 6;
        let (mut fwd, mut back) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..reps {
            let input: Vec<u32> = std::iter::repeat_n(token, k + 1).collect();
            let len = kv.len;
            let t0 = Instant::now();
            g.step(&mut kv, &input, k + 1, |_| true, None).expect("verify");
            fwd += t0.elapsed();
            let t1 = Instant::now();
            kv.truncate(len + 1).expect("truncate");
            back += t1.elapsed();
        }
        println!(
            "profile: 1+{k} tokens in one pass: forward {:.2} ms, roll back {:.3} ms (cache {} tokens)",
            ms(fwd) / reps as f64,
            ms(back) / reps as f64,
            kv.len
        );
    }
    let t = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(sampler.pick(&row0, allowed));
    }
    println!(
        "profile: pick over the full vocabulary, in isolation: {:.3} ms",
        ms(t.elapsed()) / 100.0
    );
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
    let prompt = encode(
        &files,
        &template,
        &[TurnView {
            role: "user".into(),
            content: BENCH_PROMPT.into(),
        }],
    );
    let engine = Engine::start(
        files.clone(),
        EngineSettings {
            session: SessionSettings {
                threads: a.threads,
                spinning: a.spinning,
            },
            max_concurrent: 8,
            queue_capacity: 8,
            draft_head: a.head,
        },
    )
    .expect("engine starts");
    let has_head = engine.draft_head && a.draft > 0;
    println!(
        "# tiergate engine: {} loaded in {:.2}s, intra_op_threads={}, spinning={}, draft_tokens={}, draft_head={}",
        a.model_dir.display(),
        t_load.elapsed().as_secs_f64(),
        a.threads,
        a.spinning,
        a.draft,
        has_head
    );
    if a.profile {
        drop(engine);
        profile(&files, &prompt, &a);
        return;
    }
    if let Some(path) = &a.prompts {
        // One warm-up generation, then each prompt plain and speculative.
        run(&engine, job(&prompt, 8, 0));
        let prompts = read_prompts(path);
        let run_prompt = |p: &BenchPrompt| {
            let ids = encode(&files, &template, &p.turns);
            let mut plain_ids = None;
            for (mode, draft, head) in [("plain", 0, false), ("lookup", a.draft, false), ("spec", a.draft, true)] {
                // Without a head, `lookup` is `spec`.
                if mode != "plain" && draft == 0 || mode == "lookup" && !has_head {
                    continue;
                }
                let mut j = job(&ids, p.max_tokens, draft);
                j.ignore_eos = p.ignore_eos;
                j.draft_head = head;
                let (f, _) = run(&engine, j);
                let same = plain_ids.as_ref().is_none_or(|ids: &Vec<u32>| *ids == f.output_ids);
                println!(
                    "RESULT side=tiergate-{mode} prompt={} prompt_tokens={} new_tokens={} prefill_ms={:.1} decode_tok_s={:.2} steps={} drafted={} accepted={} guessed={} guessed_right={} same_as_plain={same} ids_sum={}",
                    p.name,
                    ids.len(),
                    f.completion_tokens,
                    f.prefill.as_secs_f64() * 1000.0,
                    (f.completion_tokens.saturating_sub(1)) as f64 / f.decode.as_secs_f64(),
                    f.decode_steps,
                    f.drafted,
                    f.accepted,
                    f.guessed,
                    f.guessed_right,
                    checksum(&f.output_ids),
                );
                plain_ids.get_or_insert(f.output_ids);
            }
        };
        if a.serve {
            // Driven by benches/local_generator_paired.py: one prompt name per line.
            println!("READY");
            for line in std::io::stdin().lines() {
                let name = line.expect("stdin");
                match prompts.iter().find(|p| p.name == name.trim()) {
                    Some(p) => run_prompt(p),
                    None => println!("ERROR no prompt {name:?}"),
                }
                println!("DONE");
            }
        } else {
            prompts.iter().for_each(run_prompt);
        }
        println!(
            "rss_mib={} peak_rss_mib={}",
            status_kib("VmRSS:") / 1024,
            status_kib("VmHWM:") / 1024
        );
        return;
    }

    // NEW_TOKENS + 1 generated tokens: the first comes from the prefill step, the other 64
    // from decode steps (as in the Python loop).
    let mut prefills = Vec::new();
    let mut ttfts = Vec::new();
    let mut decodes = Vec::new();
    let mut out_ids = Vec::new();
    for r in 0..=a.repeat {
        let (f, ttft) = run(&engine, job(&prompt, NEW_TOKENS + 1, a.draft));
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
            .map(|_| engine.submit(job(&prompt, NEW_TOKENS, a.draft)).expect("room"))
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
