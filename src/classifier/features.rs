//! The feature recipe of `router-model/FEATURES.md`, in Rust: scored text → token ids
//! (character window, WordPiece, head+tail cut) → encoder → pooled states + hand features,
//! concatenated in the order the head expects. Must agree with `router-model/features.py`.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use serde::Deserialize;

/// `router-model/head.json`: how the committed head was trained.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub max_tokens: usize,
    pub head_tokens: usize,
    pub char_head: usize,
    pub char_tail: usize,
    pub cls_id: u32,
    pub sep_id: u32,
    /// Feature blocks in head input order: `mean`, `mean_l2` (mean then L2-normalised),
    /// `max`, `cls` (pooled encoder states over real tokens incl. `[CLS]`/`[SEP]`) and hand
    /// features: `log1p_chars` = ln(1 + Unicode scalar values of the whole scored text).
    pub features: Vec<String>,
    /// sha256 of the encoder's `model.onnx` the head was trained on; checked at load, so a
    /// head is never fed another encoder's states.
    #[serde(default)]
    pub encoder_sha256: Option<String>,
    /// The encoder's graph as run, a file beside this spec. Its weights are not in it: they are
    /// read from `model.onnx` in the encoder directory (ONNX external data, by byte offset),
    /// so the graph can be committed while the weights stay a provisioned, pinned download.
    /// Without it, `model.onnx` itself is run.
    #[serde(default)]
    pub encoder_graph: Option<String>,
    /// `encoder_graph` resolved against the spec's directory.
    #[serde(skip)]
    pub encoder_graph_path: Option<PathBuf>,
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        let mut spec: Spec = serde_json::from_str(&text).map_err(|e| format!("`{}`: {e}", path.display()))?;
        if let Some(g) = &spec.encoder_graph {
            // The graph reads its weights by byte offset: only the exact file it was built
            // from gives the right numbers, so it must be pinned.
            if spec.encoder_sha256.is_none() {
                return Err(format!(
                    "`{}`: encoder_graph needs encoder_sha256 (the sha256 of the model.onnx it reads its weights from)",
                    path.display()
                ));
            }
            spec.encoder_graph_path = Some(path.parent().unwrap_or(Path::new(".")).join(g));
        }
        for f in &spec.features {
            if !matches!(f.as_str(), "mean" | "mean_l2" | "max" | "cls" | "log1p_chars") {
                return Err(format!("`{}`: unknown feature `{f}`", path.display()));
            }
        }
        if spec.max_tokens < 3 || spec.head_tokens > spec.max_tokens - 2 {
            return Err(format!(
                "`{}`: need max_tokens >= 3 and head_tokens <= max_tokens - 2",
                path.display()
            ));
        }
        Ok(spec)
    }
}

impl Spec {
    /// The integer encoder graph if it is the one to run here: the spec names one and this
    /// CPU computes its products exactly. `None`: run the float `model.onnx`.
    pub fn graph_to_run(&self) -> Option<&Path> {
        self.encoder_graph_path.as_deref().filter(|_| integer_kernels_exact())
    }
}

/// Cuts a long text to its first `head` and last `tail` characters joined by a newline,
/// so tokenization cost is bounded however long the prompt.
pub fn char_window(text: &str, head: usize, tail: usize) -> std::borrow::Cow<'_, str> {
    let n = text.chars().count();
    if n <= head + tail {
        return text.into();
    }
    let head_end = text.char_indices().nth(head).map_or(text.len(), |(i, _)| i);
    let tail_start = text.char_indices().nth(n - tail).map_or(text.len(), |(i, _)| i);
    format!("{}\n{}", &text[..head_end], &text[tail_start..]).into()
}

/// Content ids → `[CLS] head … tail [SEP]`, at most `max_tokens` long.
pub fn truncate_ids(content: &[u32], spec: &Spec) -> Vec<i64> {
    let budget = spec.max_tokens - 2;
    let mut out = Vec::with_capacity(spec.max_tokens);
    out.push(i64::from(spec.cls_id));
    if content.len() > budget {
        let tail = budget - spec.head_tokens;
        out.extend(content[..spec.head_tokens].iter().map(|&i| i64::from(i)));
        out.extend(content[content.len() - tail..].iter().map(|&i| i64::from(i)));
    } else {
        out.extend(content.iter().map(|&i| i64::from(i)));
    }
    out.push(i64::from(spec.sep_id));
    out
}

/// Tokenizer, encoder and head of one worker. Not shared: ort sessions run with `&mut`.
pub struct Featurizer {
    tokenizer: tokenizers::Tokenizer,
    encoder: Session,
    head: Session,
    spec: Spec,
    hidden: usize,
}

/// Where a session's graph comes from.
enum Graph<'a> {
    File(&'a Path),
    /// A graph whose weights are external data in files of `weights_dir`.
    Split {
        graph: &'a Path,
        weights_dir: &'a Path,
    },
}

fn session(from: Graph<'_>, threads: usize, spinning: bool) -> Result<Session, String> {
    let path = match from {
        Graph::File(p) | Graph::Split { graph: p, .. } => p,
    };
    let err = |e: ort::Error| format!("cannot load `{}`: {e}", path.display());
    let mut builder = Session::builder(crate::onnx::environment().ok_or("ONNX Runtime is not loaded")?)
        .map_err(err)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| err(e.into()))?
        .with_intra_threads(threads)
        .map_err(|e| err(e.into()))?
        .with_inter_threads(1)
        .map_err(|e| err(e.into()))?
        .with_config_entry("session.intra_op.allow_spinning", if spinning { "1" } else { "0" })
        .map_err(|e| err(e.into()))?;
    match from {
        Graph::File(p) => builder.commit_from_file(p).map_err(err),
        Graph::Split { graph, weights_dir } => {
            let err = |e: ort::Error| {
                format!(
                    "cannot load `{}`: {e}; restore it (router-model/encoder.onnx in the repository, \
                     `python router-model/build_encoder.py` rebuilds it) or set routing.classifier.encoder = \"float\"",
                    graph.display()
                )
            };
            let bytes = std::fs::read(graph).map_err(|e| {
                format!(
                    "cannot read `{}` (the spec's encoder_graph): {e}; restore it, or set \
                     routing.classifier.encoder = \"float\"",
                    graph.display()
                )
            })?;
            // Loaded from memory, ONNX Runtime would look for external data in the working
            // directory; this points it at the encoder's directory instead.
            builder
                .with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    weights_dir.to_string_lossy(),
                )
                .map_err(|e| err(e.into()))?
                .commit_from_memory(&bytes)
                .map_err(err)
        }
    }
}

/// Whether ONNX Runtime's uint8 × int8 products are exact on this CPU. On x86 without VNNI
/// they go through `vpmaddubsw`, which saturates pairs of products at 16 bits, so there the
/// float `model.onnx` is run instead of the integer graph. Mirrors `features.py`.
pub fn integer_kernels_exact() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        true
    }
}

/// Checks that `model.onnx` in `encoder_dir` is the file the head was trained on.
pub fn check_encoder(encoder_dir: &Path, spec: &Spec) -> Result<(), String> {
    use sha2::Digest;
    let Some(want) = &spec.encoder_sha256 else {
        return Ok(());
    };
    let path = encoder_dir.join("model.onnx");
    let mut hasher = sha2::Sha256::new();
    std::fs::File::open(&path)
        .and_then(|mut f| std::io::copy(&mut f, &mut hasher))
        .map_err(|e| {
            format!(
                "cannot read `{}`: {e}; run `python3 scripts/provision.py` (or set routing.classifier.encoder_dir)",
                path.display()
            )
        })?;
    let got = crate::auth::store::hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(want) {
        return Err(format!(
            "`{}` has sha256 {got}, but the head's spec (encoder_sha256) says it was trained on {want}: \
             run `python3 scripts/provision.py` for the pinned encoder, or point \
             routing.classifier.encoder_dir at the one the head was trained on",
            path.display()
        ));
    }
    Ok(())
}

impl Featurizer {
    /// `spinning`: ONNX Runtime's intra-op threads busy-wait for work after each run; that
    /// shaves wake-ups off a score but burns CPU that other work may need.
    pub fn load(
        encoder_dir: &Path,
        head: &Path,
        spec: Spec,
        threads: usize,
        spinning: bool,
    ) -> Result<Featurizer, String> {
        let tok_path = encoder_dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| format!("cannot load `{}`: {e}", tok_path.display()))?;
        // The shipped tokenizer.json pads and truncates to 128; the recipe does its own cut.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| format!("tokenizer: {e}"))?;
        let weights = encoder_dir.join("model.onnx");
        let encoder = match spec.graph_to_run() {
            Some(graph) => session(
                Graph::Split {
                    graph,
                    weights_dir: encoder_dir,
                },
                threads,
                spinning,
            )?,
            None => session(Graph::File(&weights), threads, spinning)?,
        };
        let head = session(Graph::File(head), 1, false)?;
        Ok(Featurizer {
            tokenizer,
            encoder,
            head,
            spec,
            hidden: 384,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>, String> {
        let window = char_window(text, self.spec.char_head, self.spec.char_tail);
        let enc = self
            .tokenizer
            .encode(window.as_ref(), false)
            .map_err(|e| format!("tokenize: {e}"))?;
        Ok(truncate_ids(enc.get_ids(), &self.spec))
    }

    /// Scores a batch; the caller groups texts of similar length (padding is to the longest).
    pub fn score(&mut self, texts: &[&str]) -> Result<Vec<f32>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Vec<i64>> = texts.iter().map(|t| self.encode(t)).collect::<Result<_, _>>()?;
        let b = ids.len();
        let dim = self.feature_dim();
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut input = vec![0i64; b * t];
        let mut mask = vec![0i64; b * t];
        for (i, row) in ids.iter().enumerate() {
            input[i * t..i * t + row.len()].copy_from_slice(row);
            mask[i * t..i * t + row.len()].fill(1);
        }
        let types = vec![0i64; b * t];
        let run_err = |e: ort::Error| format!("encoder: {e}");
        let outputs = self
            .encoder
            .run(ort::inputs![
                "input_ids" => TensorRef::from_array_view(([b, t], &*input)).map_err(run_err)?,
                "attention_mask" => TensorRef::from_array_view(([b, t], &*mask)).map_err(run_err)?,
                "token_type_ids" => TensorRef::from_array_view(([b, t], &*types)).map_err(run_err)?,
            ])
            .map_err(run_err)?;
        let (shape, hidden) = outputs["last_hidden_state"]
            .try_extract_tensor::<f32>()
            .map_err(run_err)?;
        let h = self.hidden;
        if shape.len() != 3 || shape[2] as usize != h {
            return Err(format!("encoder output shape {shape:?}, expected [b, t, {h}]"));
        }
        let mut feats = vec![0f32; b * dim];
        for (i, row) in ids.iter().enumerate() {
            let states = &hidden[i * t * h..(i + 1) * t * h];
            let n = row.len();
            let out = &mut feats[i * dim..(i + 1) * dim];
            let mut at = 0;
            for f in &self.spec.features {
                match f.as_str() {
                    "mean" | "mean_l2" => {
                        let o = &mut out[at..at + h];
                        for tok in 0..n {
                            for (k, v) in o.iter_mut().enumerate() {
                                *v += states[tok * h + k];
                            }
                        }
                        o.iter_mut().for_each(|v| *v /= n as f32);
                        if f == "mean_l2" {
                            let norm = o.iter().map(|v| v * v).sum::<f32>().sqrt();
                            if norm > 0.0 {
                                o.iter_mut().for_each(|v| *v /= norm);
                            }
                        }
                        at += h;
                    }
                    "max" => {
                        let o = &mut out[at..at + h];
                        o.fill(f32::NEG_INFINITY);
                        for tok in 0..n {
                            for (k, v) in o.iter_mut().enumerate() {
                                *v = v.max(states[tok * h + k]);
                            }
                        }
                        at += h;
                    }
                    "cls" => {
                        out[at..at + h].copy_from_slice(&states[..h]);
                        at += h;
                    }
                    "log1p_chars" => {
                        out[at] = (texts[i].chars().count() as f64).ln_1p() as f32;
                        at += 1;
                    }
                    other => return Err(format!("unknown feature `{other}`")),
                }
            }
        }
        drop(outputs);
        let head_err = |e: ort::Error| format!("head: {e}");
        let out = self
            .head
            .run(ort::inputs![
                TensorRef::from_array_view(([b, dim], &*feats)).map_err(head_err)?
            ])
            .map_err(head_err)?;
        let (_, scores) = out[0].try_extract_tensor::<f32>().map_err(head_err)?;
        if scores.len() != b {
            return Err(format!("head returned {} scores for {b} texts", scores.len()));
        }
        Ok(scores.to_vec())
    }

    fn feature_dim(&self) -> usize {
        self.spec
            .features
            .iter()
            .map(|f| {
                if matches!(f.as_str(), "mean" | "mean_l2" | "max" | "cls") {
                    self.hidden
                } else {
                    1
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            max_tokens: 6,
            head_tokens: 1,
            char_head: 3,
            char_tail: 2,
            cls_id: 101,
            sep_id: 102,
            features: vec!["mean".into()],
            encoder_sha256: None,
            encoder_graph: None,
            encoder_graph_path: None,
        }
    }

    #[test]
    fn long_texts_keep_head_and_tail() {
        assert_eq!(char_window("abcdef", 3, 2), "abc\nef");
        assert_eq!(char_window("abcde", 3, 2), "abcde");
        assert_eq!(char_window("日本語テキスト", 3, 2), "日本語\nスト");
        assert_eq!(truncate_ids(&[1, 2, 3, 4, 5, 6], &spec()), vec![101, 1, 4, 5, 6, 102]);
        assert_eq!(truncate_ids(&[1, 2], &spec()), vec![101, 1, 2, 102]);
    }

    #[test]
    fn an_encoder_graph_must_be_pinned_to_its_weights() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("head.json");
        let text = r#"{"max_tokens": 32, "head_tokens": 8, "char_head": 512, "char_tail": 1024,
            "cls_id": 101, "sep_id": 102, "features": ["mean_l2"], "encoder_graph": "enc.onnx"}"#;
        std::fs::write(&path, text).expect("write");
        let e = Spec::load(&path).expect_err("graph without sha256");
        assert!(e.contains("encoder_graph needs encoder_sha256"), "{e}");
        let pinned = text.replace("\"enc.onnx\"", "\"enc.onnx\", \"encoder_sha256\": \"ab\"");
        std::fs::write(&path, pinned).expect("write");
        // Resolved beside the spec; whether it exists matters only where it would run.
        let spec = Spec::load(&path).expect("spec");
        assert_eq!(spec.encoder_graph_path, Some(dir.path().join("enc.onnx")));
    }

    #[test]
    fn another_encoder_than_the_heads_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = spec();
        assert_eq!(check_encoder(dir.path(), &s), Ok(()), "no sha256: nothing to check");
        s.encoder_sha256 = Some("8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6".into());
        let e = check_encoder(dir.path(), &s).expect_err("missing");
        assert!(e.contains("model.onnx"), "{e}");
        std::fs::write(dir.path().join("model.onnx"), b"abc").expect("write");
        let e = check_encoder(dir.path(), &s).expect_err("other file");
        assert!(
            e.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            "{e}"
        );
        s.encoder_sha256 = Some("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD".into());
        assert_eq!(check_encoder(dir.path(), &s), Ok(()));
    }
}
