//! The generation engine: one dedicated thread that owns the ONNX session and runs up to
//! `max_concurrent` sequences, one decode step each in turn, fed by a bounded admission
//! queue. It never runs on the async runtime; answers go back as events on a channel per
//! sequence. Admission is counted so that a full engine says "saturated" at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::confidence::{self, Confidence};
use super::draft::{self, DraftHead};
use super::lookup::PromptLookup;
use super::model::{Graph, KvCache, ModelFiles, SessionSettings};
use super::sampling::{Pick, Sampler, SamplingParams};
use super::text::{Detokenizer, StopMatcher};

/// How the engine is sized.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub session: SessionSettings,
    /// Sequences decoded at the same time (interleaved step by step).
    pub max_concurrent: usize,
    /// Requests waiting for a free sequence slot; beyond this the engine is saturated.
    pub queue_capacity: usize,
    /// Load the model's draft head, if it has one ([`draft`]).
    pub draft_head: bool,
}

/// One generation to run.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    /// Most tokens to generate (already clamped to the context window).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past the model's stop ids (vLLM's `ignore_eos`; benchmarks use it).
    pub ignore_eos: bool,
    /// Most tokens prompt lookup drafts per decode step for the model to verify (0: plain
    /// one-token steps). Greedy jobs only: a sampled job never drafts.
    pub draft_tokens: usize,
    /// When lookup has no draft, draft the draft head's guess (if the engine has a head and
    /// `draft_tokens` > 0).
    pub draft_head: bool,
    /// After this many generated tokens, report the answer's confidence so far
    /// (`Event::Prefix`) unless the answer ended there; 0: never.
    pub assess_after: usize,
}

/// What the engine reports for a sequence, in order: text pieces (with at most one
/// `Prefix` among them, for a job with `assess_after`), then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// Text released to the client, with what the sequence has used so far: the exact
    /// counts a stream that is cut off records.
    Text {
        text: String,
        used: Used,
    },
    /// The first `assess_after` tokens are generated and the answer goes on.
    Prefix(Prefix),
    Done(Finish),
    Failed(String),
}

/// Tokens a sequence has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The answer so far, judged: what a caller needs to decide whether to keep it.
#[derive(Debug, Clone, Copy)]
pub struct Prefix {
    pub used: Used,
    pub confidence: Confidence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id or a stop sequence.
    Stop,
    /// `max_tokens`, or the context window is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Every token the model generated, the stop id included.
    pub completion_tokens: usize,
    pub output_ids: Vec<u32>,
    pub confidence: Confidence,
    /// Time of the prompt's forward pass, and of the decode steps after it.
    pub prefill: Duration,
    pub decode: Duration,
    /// Forward passes after the prompt's (fewer than the tokens when drafts were accepted).
    pub decode_steps: usize,
    /// Tokens drafted (by prompt lookup and the draft head), and how many of them the
    /// model confirmed.
    pub drafted: usize,
    pub accepted: usize,
    /// Of those, the draft head's guesses, and how many of them were right.
    pub guessed: usize,
    pub guessed_right: usize,
}

/// Running totals of what the engine has done, over every sequence (finished, failed or
/// cancelled), for `/metrics`: the rates an operator watches to see whether speculation
/// pays on their traffic.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Forward passes after a prompt's.
    pub decode_steps: AtomicU64,
    /// Tokens drafted by prompt lookup and by the draft head, and how many of them the model
    /// confirmed into an answer: generated = one per prompt pass + decode_steps + accepted.
    pub lookup_drafted: AtomicU64,
    pub lookup_accepted: AtomicU64,
    pub head_drafted: AtomicU64,
    pub head_accepted: AtomicU64,
}

impl EngineStats {
    fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// The admission was refused: every sequence slot and every queue place is taken.
#[derive(Debug)]
pub struct Saturated;

/// Handle to a running engine; cheap to share. Dropping the last handle lets the engine
/// thread finish its sequences and exit.
pub struct Engine {
    tx: SyncSender<Queued>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    pub files: Arc<ModelFiles>,
    /// The model's draft head is loaded and guesses for drafting jobs.
    pub draft_head: bool,
    pub stats: Arc<EngineStats>,
}

struct Queued {
    job: Job,
    events: UnboundedSender<Event>,
    _permit: Permit,
}

/// One admitted request (running or waiting); released when its sequence ends or is
/// dropped unrun.
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    /// Loads the model (blocking: seconds for a large one) and starts the engine thread.
    pub fn start(files: Arc<ModelFiles>, settings: EngineSettings) -> Result<Engine, String> {
        let graph = Graph::load(&files, settings.session)?;
        let head = match &files.draft_head {
            Some(path) if settings.draft_head => {
                if !graph.has_hidden {
                    return Err(format!(
                        "`{}` has a draft head, but its model.onnx has no `{}` output to feed it; provision the model again, or remove the head",
                        files.dir.display(),
                        draft::HIDDEN_OUTPUT
                    ));
                }
                // One thread: its matmuls are too small to share (and no slower alone).
                let one = SessionSettings {
                    threads: 1,
                    ..settings.session
                };
                Some(DraftHead::load(path, one)?)
            }
            _ => None,
        };
        let limit = settings.max_concurrent + settings.queue_capacity;
        // The admission counter keeps at most `limit` jobs in flight, so this channel is
        // never full when a job is sent.
        let (tx, rx) = sync_channel(limit);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let f = files.clone();
        let max_concurrent = settings.max_concurrent;
        let draft_head = head.is_some();
        let stats = Arc::new(EngineStats::default());
        let counts = stats.clone();
        std::thread::Builder::new()
            .name("tiergate-local".into())
            .spawn(move || run(graph, head, &f, &rx, max_concurrent, &counts))
            .map_err(|e| format!("cannot start the local engine thread: {e}"))?;
        Ok(Engine {
            tx,
            in_flight,
            limit,
            files,
            draft_head,
            stats,
        })
    }

    /// Admits a job or refuses it at once when the engine is saturated. Events arrive on
    /// the returned channel; dropping it cancels the sequence at its next step.
    pub fn submit(&self, job: Job) -> Result<UnboundedReceiver<Event>, Saturated> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map_err(|_| Saturated)?;
        let permit = Permit(self.in_flight.clone());
        // Unbounded, yet bounded in practice: one sequence sends at most `max_tokens + 1`
        // events. A bounded channel would let one slow client stall every sequence on the
        // shared engine thread.
        let (events, rx) = unbounded_channel();
        match self.tx.try_send(Queued {
            job,
            events,
            _permit: permit,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(q) | TrySendError::Disconnected(q)) => {
                // Only if the engine thread died: tell the caller through the channel.
                let _ = q.events.send(Event::Failed("the local engine has stopped".to_owned()));
                Ok(rx)
            }
        }
    }

    /// Requests running or waiting now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// A sequence being generated.
struct Seq {
    q: Queued,
    kv: KvCache,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    /// The prompt, then every generated token: what prompt lookup searches.
    history: Vec<u32>,
    out: Vec<u32>,
    logprobs: Vec<f32>,
    lookup: PromptLookup,
    /// Whether the draft head guesses for this sequence.
    use_head: bool,
    /// The final hidden state of the row that produced the last token (with `use_head`).
    hidden: Vec<f32>,
    guessed: usize,
    guessed_right: usize,
    prefill: Duration,
    decode: Duration,
    decode_steps: usize,
    done: bool,
}

/// Buffers the engine thread reuses across steps.
#[derive(Default)]
struct Scratch {
    input: Vec<u32>,
    draft: Vec<u32>,
    picks: Vec<Pick>,
    /// Hidden states the draft head predicts, when it chains guesses.
    predicted: [Vec<f32>; 2],
}

fn run(
    mut graph: Graph,
    mut head: Option<DraftHead>,
    files: &ModelFiles,
    rx: &Receiver<Queued>,
    max_concurrent: usize,
    stats: &EngineStats,
) {
    let mut active: Vec<Seq> = Vec::with_capacity(max_concurrent);
    let mut scratch = Scratch::default();
    let mut open = true;
    loop {
        while open && active.len() < max_concurrent {
            let next = if active.is_empty() {
                rx.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match next {
                Ok(q) => {
                    // The client left while the request waited: skip it.
                    if q.events.is_closed() {
                        continue;
                    }
                    active.push(Seq::new(q, head.is_some()));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if active.is_empty() {
            return;
        }
        for seq in active.iter_mut() {
            seq.advance(&mut graph, &mut head, files, &mut scratch, stats);
        }
        // Dropping a finished sequence releases its admission permit.
        active.retain(|s| !s.done);
    }
}

impl Seq {
    fn new(q: Queued, have_head: bool) -> Seq {
        let sampler = Sampler::new(q.job.sampling);
        let stop = StopMatcher::new(q.job.stop.clone());
        // Drafts are checked against the greedy choice; a sampled answer never drafts.
        let draft_tokens = if q.job.sampling.is_greedy() {
            q.job.draft_tokens
        } else {
            0
        };
        let use_head = have_head && draft_tokens > 0 && q.job.draft_head;
        Seq {
            history: q.job.prompt.clone(),
            q,
            kv: KvCache::default(),
            sampler,
            detok: Detokenizer::default(),
            stop,
            out: Vec::new(),
            logprobs: Vec::new(),
            lookup: PromptLookup::new(draft_tokens),
            use_head,
            hidden: Vec::new(),
            guessed: 0,
            guessed_right: 0,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            decode_steps: 0,
            done: false,
        }
    }

    /// One forward step: the prompt first, then the last generated token followed by any
    /// drafted tokens (lookup's, or else the draft head's guess). Gives out every token the
    /// step settled: the greedy choice after each confirmed draft token, exactly what
    /// one-token steps would have chosen.
    fn advance(
        &mut self,
        graph: &mut Graph,
        head: &mut Option<DraftHead>,
        files: &ModelFiles,
        scratch: &mut Scratch,
        stats: &EngineStats,
    ) {
        if self.q.events.is_closed() {
            // Cancelled: the client went away.
            self.done = true;
            return;
        }
        let t0 = Instant::now();
        let Scratch {
            input,
            draft,
            picks,
            predicted,
        } = scratch;
        input.clear();
        draft.clear();
        picks.clear();
        let first = self.out.is_empty();
        let mut guessed = false;
        match self.out.last() {
            Some(&last) => {
                // Every drafted token that is confirmed brings one more token after it:
                // keep within `max_tokens` and the context window.
                let produced = self.q.job.prompt.len() + self.out.len();
                let room = (self.q.job.max_tokens.saturating_sub(self.out.len()))
                    .min(files.context_tokens.saturating_sub(produced))
                    .saturating_sub(1);
                self.lookup.draft(&self.history, room, draft);
                if draft.is_empty() && room > 0 && self.use_head {
                    guessed = self.guess(head, last, room, draft, predicted);
                }
                input.push(last);
                input.extend_from_slice(draft);
            }
            None => input.extend_from_slice(&self.q.job.prompt),
        }
        let allowed = files.real_vocab.min(graph.vocab);
        let sampler = &mut self.sampler;
        let hidden = self.use_head.then_some(&mut self.hidden);
        let visited = graph.step(
            &mut self.kv,
            input,
            1 + draft.len(),
            |row| {
                let pick = sampler.pick(row, allowed);
                let confirmed = draft.get(picks.len()) == Some(&pick.token);
                picks.push(pick);
                confirmed
            },
            hidden,
        );
        let accepted = match visited {
            Ok(visited) => visited - 1,
            Err(e) => return self.fail(e),
        };
        if accepted < draft.len() {
            // The cache holds every drafted position; keep the confirmed ones.
            let keep = self.kv.len - (draft.len() - accepted);
            if let Err(e) = self.kv.truncate(keep) {
                return self.fail(e);
            }
        }
        if guessed {
            // A guess is not lookup's: its misses must not pause lookup or shorten its drafts.
            self.guessed += draft.len();
            self.guessed_right += accepted;
        } else {
            self.lookup.record(draft.len(), accepted);
        }
        if first {
            self.prefill = t0.elapsed();
            EngineStats::add(&stats.prompt_tokens, self.q.job.prompt.len());
        } else {
            self.decode += t0.elapsed();
            self.decode_steps += 1;
            EngineStats::add(&stats.decode_steps, 1);
        }
        let mut emitted = 0;
        for &pick in picks.iter() {
            emitted += 1;
            if self.emit(files, pick) {
                break;
            }
        }
        // Every token a pass gives out past its first is a confirmed draft token that saved
        // a pass; confirmed ones past the answer's end (a stop inside the draft) saved none.
        EngineStats::add(&stats.generated_tokens, emitted);
        let (drafted, useful) = if guessed {
            (&stats.head_drafted, &stats.head_accepted)
        } else {
            (&stats.lookup_drafted, &stats.lookup_accepted)
        };
        EngineStats::add(drafted, draft.len());
        EngineStats::add(useful, emitted - 1);
    }

    /// Drafts the head's guesses of the tokens after `last`, each from the hidden state
    /// the head predicted for the one before, while they are confident enough. True when
    /// it drafted any. A head that fails is not the answer's failure: the sequence goes on
    /// without guesses.
    fn guess(
        &mut self,
        head: &mut Option<DraftHead>,
        last: u32,
        room: usize,
        draft: &mut Vec<u32>,
        predicted: &mut [Vec<f32>; 2],
    ) -> bool {
        let Some(head) = head.as_mut() else {
            return false;
        };
        let mut token = last;
        for i in 0..draft::MAX_GUESSES.min(room) {
            let [from, next] = predicted;
            let hidden = if i == 0 { &self.hidden } else { &*from };
            match head.guess(hidden, token, next) {
                Ok((guess, confidence)) if confidence >= draft::MIN_CONFIDENCE => {
                    draft.push(guess);
                    token = guess;
                    predicted.swap(0, 1);
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "draft head failed; this answer goes on without its guesses");
                    self.use_head = false;
                    break;
                }
            }
        }
        !draft.is_empty()
    }

    /// Gives out one generated token. True when the sequence ended with it.
    fn emit(&mut self, files: &ModelFiles, pick: Pick) -> bool {
        self.out.push(pick.token);
        self.history.push(pick.token);
        self.logprobs.push(pick.logprob);

        if !self.q.job.ignore_eos && files.stop_ids.contains(&pick.token) {
            self.finish(files, FinishReason::Stop);
            return true;
        }
        let piece = self.detok.push(&files.tokenizer, pick.token);
        if self.release(piece) {
            return true;
        }
        // Every generated token but the last one is in the cache; the next step feeds it.
        let full_context = self.q.job.prompt.len() + self.out.len() >= files.context_tokens;
        if self.out.len() >= self.q.job.max_tokens || full_context {
            self.finish(files, FinishReason::Length);
            return true;
        }
        if self.out.len() == self.q.job.assess_after {
            let _ = self.q.events.send(Event::Prefix(Prefix {
                used: self.used(),
                confidence: confidence::assess(&self.out, &self.logprobs),
            }));
        }
        false
    }

    /// Passes detokenized text through the stop matcher to the client. True when the
    /// sequence ended here (a stop sequence, or a decoding failure).
    fn release(&mut self, piece: Result<Option<String>, String>) -> bool {
        match piece {
            Ok(Some(piece)) => {
                let r = self.stop.push(&piece);
                self.send_text(r.text);
                if r.stopped {
                    self.summary(FinishReason::Stop);
                }
                r.stopped
            }
            Ok(None) => false,
            Err(e) => {
                self.fail(e);
                true
            }
        }
    }

    fn send_text(&self, text: String) {
        if !text.is_empty() {
            let used = self.used();
            let _ = self.q.events.send(Event::Text { text, used });
        }
    }

    fn used(&self) -> Used {
        Used {
            prompt_tokens: self.q.job.prompt.len(),
            completion_tokens: self.out.len(),
        }
    }

    /// Ends the answer: gives out held-back text (unless it turns out to hold a stop
    /// sequence), then the summary.
    fn finish(&mut self, files: &ModelFiles, reason: FinishReason) {
        let rest = self.detok.finish(&files.tokenizer);
        if self.release(rest) {
            return;
        }
        let tail = self.stop.finish();
        self.send_text(tail);
        self.summary(reason);
    }

    fn summary(&mut self, reason: FinishReason) {
        let confidence = confidence::assess(&self.out, &self.logprobs);
        let _ = self.q.events.send(Event::Done(Finish {
            reason,
            prompt_tokens: self.q.job.prompt.len(),
            completion_tokens: self.out.len(),
            output_ids: std::mem::take(&mut self.out),
            confidence,
            prefill: self.prefill,
            decode: self.decode,
            decode_steps: self.decode_steps,
            drafted: self.lookup.drafted + self.guessed,
            accepted: self.lookup.accepted + self.guessed_right,
            guessed: self.guessed,
            guessed_right: self.guessed_right,
        }));
        self.done = true;
    }

    fn fail(&mut self, e: String) {
        let _ = self.q.events.send(Event::Failed(e));
        self.done = true;
    }
}
