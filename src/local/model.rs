//! One decoder-only model in the Hugging Face Optimum ONNX layout: its files (config,
//! generation config, tokenizer, chat template), its ONNX Runtime session, and one forward
//! step over a KV cache. It owns no thread and no queue; the engine drives it.

use std::path::{Path, PathBuf};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::{DynValue, Tensor, TensorElementType};
use serde_json::Value;

/// What the engine needs to know about a model directory, read once at load.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `max_position_embeddings`: the longest sequence (prompt + answer) the model was
    /// trained for.
    pub context_tokens: usize,
    /// Ids that end an answer: `generation_config.eos_token_id` plus the tokenizer's
    /// `eos_token`.
    pub stop_ids: Vec<u32>,
    pub chat_template: String,
    pub bos_token: String,
    pub eos_token: String,
    pub tokenizer: tokenizers::Tokenizer,
    /// Ids at or above this are not real tokens (Qwen pads its logits to 151936 rows with
    /// `[PAD…]` fillers): they are never sampled.
    pub real_vocab: usize,
    /// The graph computes every row of a multi-token pass exactly as a one-token pass would
    /// (`"rows_exact": true` in `tiergate_model.json`, written by provisioning for `row8`
    /// graphs), so speculative verification returns plain greedy decoding's tokens.
    pub rows_exact: bool,
    /// A trained draft head beside the model ([`super::draft::FILE`]), if there is one.
    pub draft_head: Option<PathBuf>,
}

fn read_json(dir: &Path, name: &str) -> Result<Value, String> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("`{}` is not valid JSON: {e}", path.display()))
}

fn usize_field(v: &Value, file: &str, key: &str) -> Result<usize, String> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| format!("`{file}` has no integer `{key}`"))
}

/// A special token in `tokenizer_config.json`: a string, or an object with `content`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_owned(),
        _ => String::new(),
    }
}

impl ModelFiles {
    pub fn load(dir: &Path) -> Result<ModelFiles, String> {
        if !dir.is_dir() {
            return Err(format!("model directory `{}` does not exist", dir.display()));
        }
        let config = read_json(dir, "config.json")?;
        let layers = usize_field(&config, "config.json", "num_hidden_layers")?;
        let heads = usize_field(&config, "config.json", "num_attention_heads")?;
        let kv_heads = usize_field(&config, "config.json", "num_key_value_heads").unwrap_or(heads);
        let head_dim = match usize_field(&config, "config.json", "head_dim") {
            Ok(d) => d,
            Err(_) => usize_field(&config, "config.json", "hidden_size")? / heads.max(1),
        };
        let context_tokens = usize_field(&config, "config.json", "max_position_embeddings")?;

        let tok_config = read_json(dir, "tokenizer_config.json")?;
        let chat_template = match tok_config.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // Newer configs may hold several named templates; the chat one is `default`.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned)
                .ok_or("`tokenizer_config.json` has no `default` chat template")?,
            _ => {
                return Err(
                    "`tokenizer_config.json` has no `chat_template`; the local tier needs an instruction-tuned model with one"
                        .to_owned(),
                );
            }
        };
        let bos_token = token_text(tok_config.get("bos_token"));
        let eos_token = token_text(tok_config.get("eos_token"));

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| format!("cannot load `{}`: {e}", tokenizer_path.display()))?;

        let mut stop_ids: Vec<u32> = Vec::new();
        if let Ok(generation) = read_json(dir, "generation_config.json") {
            match generation.get("eos_token_id") {
                Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|n| n as u32)),
                Some(Value::Array(a)) => stop_ids.extend(a.iter().filter_map(Value::as_u64).map(|n| n as u32)),
                _ => {}
            }
        }
        if let Some(id) = tokenizer.token_to_id(&eos_token) {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        if stop_ids.is_empty() {
            return Err(
                "no stop token: neither `generation_config.json` `eos_token_id` nor `tokenizer_config.json` `eos_token` names one"
                    .to_owned(),
            );
        }
        let real_vocab = tokenizer.get_vocab_size(true);
        // Only provisioned models carry the stamp; a user's own export is not assumed exact.
        let rows_exact = read_json(dir, "tiergate_model.json")
            .ok()
            .and_then(|v| v.get("rows_exact").and_then(Value::as_bool))
            .unwrap_or(false);
        let draft_head = Some(dir.join(super::draft::FILE)).filter(|p| p.is_file());
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            layers,
            kv_heads,
            head_dim,
            context_tokens,
            stop_ids,
            chat_template,
            bos_token,
            eos_token,
            tokenizer,
            real_vocab,
            rows_exact,
            draft_head,
        })
    }
}

/// How each graph input is fed, in the session's input order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    TokenIds,
    AttentionMask,
    PositionIds,
    PastKey(usize),
    PastValue(usize),
    /// Optimum's merged decoders switch between a no-past and a with-past branch.
    UseCacheBranch,
}

/// Session options the engine chooses per deployment.
#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    pub threads: usize,
    pub spinning: bool,
}

impl SessionSettings {
    /// An ONNX Runtime session over the graph at `path`, with these settings.
    pub fn load(&self, path: &Path) -> Result<Session, String> {
        let env = crate::onnx::environment()
            .ok_or("ONNX Runtime is not loaded; `onnx::init` must run before a model is loaded")?;
        let spin = if self.spinning { "1" } else { "0" };
        let configure = |what: &str, e: ort::Error<_>| format!("cannot set {what} on the session: {e}");
        let mut builder = Session::builder(env).map_err(ort_err("cannot create a session"))?;
        builder = builder
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| configure("the optimization level", e))?;
        builder = builder
            .with_intra_threads(self.threads)
            .map_err(|e| configure("the thread count", e))?;
        builder = builder
            .with_inter_threads(1)
            .map_err(|e| configure("the inter-op thread count", e))?;
        builder = builder
            .with_config_entry("session.intra_op.allow_spinning", spin)
            .map_err(|e| configure("spinning", e))?;
        builder
            .commit_from_file(path)
            .map_err(|e| format!("cannot load `{}`: {e}", path.display()))
    }
}

/// The ONNX graph and how to feed it.
pub struct Graph {
    session: Session,
    inputs: Vec<Input>,
    /// `present.{i}.key`, `present.{i}.value` for each layer, in cache order.
    present_names: Vec<String>,
    /// Zero-length past (`[1, kv_heads, 0, head_dim]`), fed on a sequence's first step.
    empty_past: DynValue,
    pub vocab: usize,
    /// The graph also returns its final hidden states ([`super::draft::HIDDEN_OUTPUT`]),
    /// which a draft head reads.
    pub has_hidden: bool,
}

/// One sequence's keys and values for every layer (`2 × layers` tensors, key then value),
/// as the graph returned them on the previous step; fed back unchanged (no copy).
#[derive(Default)]
pub struct KvCache {
    past: Vec<DynValue>,
    /// Tokens already in the cache.
    pub len: usize,
}

fn ort_err(what: &str) -> impl Fn(ort::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Graph {
    pub fn load(files: &ModelFiles, settings: SessionSettings) -> Result<Graph, String> {
        let path = files.dir.join("model.onnx");
        let session = settings.load(&path)?;

        let layers = files.layers;
        let mut inputs = Vec::new();
        for outlet in session.inputs() {
            let name = outlet.name();
            let role = match name {
                "input_ids" => Input::TokenIds,
                "attention_mask" => Input::AttentionMask,
                "position_ids" => Input::PositionIds,
                "use_cache_branch" => Input::UseCacheBranch,
                _ => {
                    let layer_of = |rest: &str, suffix: &str| {
                        rest.strip_suffix(suffix)
                            .and_then(|n| n.parse::<usize>().ok())
                            .filter(|&i| i < layers)
                    };
                    let rest = name.strip_prefix("past_key_values.").unwrap_or_default();
                    if let Some(i) = layer_of(rest, ".key") {
                        Input::PastKey(i)
                    } else if let Some(i) = layer_of(rest, ".value") {
                        Input::PastValue(i)
                    } else {
                        return Err(format!(
                            "`{}` has an input `{name}` the local engine does not know; it needs the Optimum decoder-with-past layout (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value`)",
                            path.display()
                        ));
                    }
                }
            };
            if let Input::PastKey(_) | Input::PastValue(_) = role
                && outlet.dtype().tensor_type() != Some(TensorElementType::Float32)
            {
                return Err(format!(
                    "`{}`: input `{name}` is not float32; export the KV cache as float32",
                    path.display()
                ));
            }
            inputs.push(role);
        }
        for needed in [Input::TokenIds, Input::AttentionMask] {
            if !inputs.contains(&needed) {
                return Err(format!(
                    "`{}` has no input {needed:?}; export it with `--task text-generation-with-past`",
                    path.display()
                ));
            }
        }
        let pasts = inputs
            .iter()
            .filter(|i| matches!(i, Input::PastKey(_) | Input::PastValue(_)))
            .count();
        if pasts != 2 * layers {
            return Err(format!(
                "`{}` has {pasts} past_key_values inputs, but config.json says {layers} layers (expected {}); export it with `--task text-generation-with-past`",
                path.display(),
                2 * layers
            ));
        }
        let output_names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if !output_names.contains(&"logits") {
            return Err(format!("`{}` has no `logits` output", path.display()));
        }
        let mut present_names = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for kv in ["key", "value"] {
                let n = format!("present.{i}.{kv}");
                if !output_names.contains(&n.as_str()) {
                    return Err(format!("`{}` has no `{n}` output", path.display()));
                }
                present_names.push(n);
            }
        }
        let vocab = session
            .outputs()
            .iter()
            .find(|o| o.name() == "logits")
            .and_then(|o| o.dtype().tensor_shape().and_then(|s| s.last().copied()))
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .unwrap_or(files.real_vocab);
        let has_hidden = output_names.contains(&super::draft::HIDDEN_OUTPUT);
        let empty_past = Tensor::<f32>::from_array(([1usize, files.kv_heads, 0, files.head_dim], Vec::<f32>::new()))
            .map_err(ort_err("cannot create the empty KV cache"))?
            .into_dyn();
        Ok(Graph {
            session,
            inputs,
            present_names,
            empty_past,
            vocab,
            has_hidden,
        })
    }

    /// Runs `ids` on top of `kv` (the whole prompt on the first step, then the last token,
    /// possibly followed by drafted tokens to verify), appends them all to the cache, and
    /// hands the logits of the last `rows` positions to `visit`, in order, until it returns
    /// false. Returns how many rows were visited. The rows are read in place from the
    /// output: nothing vocabulary-sized is copied. With `hidden` (on a graph that
    /// [`has_hidden`](Graph::has_hidden)), the final hidden state of the last row visited
    /// is copied into it.
    pub fn step(
        &mut self,
        kv: &mut KvCache,
        ids: &[u32],
        rows: usize,
        mut visit: impl FnMut(&[f32]) -> bool,
        hidden: Option<&mut Vec<f32>>,
    ) -> Result<usize, String> {
        let Graph {
            session,
            inputs,
            present_names,
            empty_past,
            ..
        } = self;
        let n = ids.len();
        let past_len = kv.len;
        let total = past_len + n;
        let mut values: Vec<SessionInputValue<'_>> = Vec::with_capacity(inputs.len());
        for role in inputs.iter() {
            let v: SessionInputValue<'_> = match *role {
                Input::TokenIds => {
                    let data: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                    Tensor::from_array(([1usize, n], data))
                        .map_err(ort_err("input_ids"))?
                        .into_dyn()
                        .into()
                }
                Input::AttentionMask => Tensor::from_array(([1usize, total], vec![1i64; total]))
                    .map_err(ort_err("attention_mask"))?
                    .into_dyn()
                    .into(),
                Input::PositionIds => {
                    let data: Vec<i64> = (past_len as i64..total as i64).collect();
                    Tensor::from_array(([1usize, n], data))
                        .map_err(ort_err("position_ids"))?
                        .into_dyn()
                        .into()
                }
                Input::UseCacheBranch => Tensor::from_array(([1usize], vec![past_len > 0]))
                    .map_err(ort_err("use_cache_branch"))?
                    .into_dyn()
                    .into(),
                Input::PastKey(i) | Input::PastValue(i) => {
                    let slot = 2 * i + usize::from(matches!(role, Input::PastValue(_)));
                    match kv.past.get(slot) {
                        Some(v) => v.into(),
                        None => (&*empty_past).into(),
                    }
                }
            };
            values.push(v);
        }
        let mut outputs = session
            .run(SessionInputs::from(values.as_slice()))
            .map_err(ort_err("the model failed"))?;
        let visited = {
            let (shape, data) = outputs["logits"]
                .try_extract_tensor::<f32>()
                .map_err(ort_err("logits"))?;
            let vocab = shape.last().copied().unwrap_or(0).max(0) as usize;
            if vocab == 0 || data.len() < n * vocab || rows == 0 || rows > n {
                return Err(format!("unexpected logits shape {shape:?}"));
            }
            let mut visited = 0;
            for row in data[(n - rows) * vocab..n * vocab].chunks_exact(vocab) {
                visited += 1;
                if !visit(row) {
                    break;
                }
            }
            visited
        };
        if let Some(hidden) = hidden {
            let (shape, data) = outputs
                .get(super::draft::HIDDEN_OUTPUT)
                .ok_or_else(|| format!("the model returned no `{}`", super::draft::HIDDEN_OUTPUT))?
                .try_extract_tensor::<f32>()
                .map_err(ort_err(super::draft::HIDDEN_OUTPUT))?;
            let width = shape.last().copied().unwrap_or(0).max(0) as usize;
            let row = n - rows + visited - 1;
            if width == 0 || data.len() < n * width {
                return Err(format!("unexpected {} shape {shape:?}", super::draft::HIDDEN_OUTPUT));
            }
            hidden.clear();
            hidden.extend_from_slice(&data[row * width..(row + 1) * width]);
        }
        let mut past = Vec::with_capacity(present_names.len());
        for name in present_names.iter() {
            past.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| format!("the model returned no `{name}`"))?,
            );
        }
        drop(outputs);
        drop(values);
        kv.past = past;
        kv.len = total;
        Ok(visited)
    }
}

impl KvCache {
    /// A copy of every layer's keys and values (key then value per layer), for checks.
    pub fn tensors(&self) -> Result<Vec<Vec<f32>>, String> {
        self.past
            .iter()
            .map(|v| {
                let (_, data) = v.try_extract_tensor::<f32>().map_err(ort_err("KV cache"))?;
                Ok(data.to_vec())
            })
            .collect()
    }

    /// Forgets every position from `len` on (drafted tokens the model did not confirm).
    /// Copies the kept part of each layer's tensors: a cache is a few MiB, a forward step
    /// copies as much in its `Concat`s, and this only runs after a rejected draft.
    pub fn truncate(&mut self, len: usize) -> Result<(), String> {
        if len >= self.len {
            return Ok(());
        }
        for v in self.past.iter_mut() {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_err("KV cache"))?;
            let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            let [b, h, t, d] = dims[..] else {
                return Err(format!("unexpected KV cache shape {shape:?}"));
            };
            if t != self.len || data.len() != b * h * t * d {
                return Err(format!("KV cache shape {shape:?} does not hold {} positions", self.len));
            }
            let mut kept = Vec::with_capacity(b * h * len * d);
            for head in data.chunks_exact(t * d) {
                kept.extend_from_slice(&head[..len * d]);
            }
            *v = Tensor::from_array(([b, h, len, d], kept))
                .map_err(ort_err("KV cache"))?
                .into_dyn();
        }
        self.len = len;
        Ok(())
    }
}
