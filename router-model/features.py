"""Feature extraction for the tiergate router: raw request text -> float32 feature vector.

This module is the reference implementation of FEATURES.md; the Rust port must match it.
Pieces:
  * scored_text(messages)      which text of a chat request is scored
  * encode(tokenizer, text)    head+tail truncated token ids (<= MAX_TOKENS incl. [CLS]/[SEP])
  * Encoder.embed(texts)       MiniLM pass, pooled token states (mean / max / CLS)
  * hand_features(text)        cheap length and structure features on the full scored text
  * build_matrix(...)          concatenation in the order the head expects
Embeddings are cached on disk under $TIERGATE_CACHE/features/ keyed by a hash of the
encoder file, the truncation settings and the text.
"""
import functools
import hashlib
import json
import math
import os
import sys

import numpy as np

CACHE = os.environ.get("TIERGATE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tiergate"))
MODEL_DIR = os.path.join(CACHE, "models", "all-minilm-l6-v2-int8")
MODEL_PATH = os.path.join(MODEL_DIR, "model.onnx")
TOKENIZER_PATH = os.path.join(MODEL_DIR, "tokenizer.json")
# The encoder as run: model.onnx's weights in a graph with integer MatMuls (build_encoder.py).
GRAPH_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoder.onnx")

MAX_TOKENS = 32           # total sequence length incl. [CLS] and [SEP] (latency budget, see README)
HEAD_TOKENS = 8           # content tokens kept from the start when truncating
# tail = MAX_TOKENS - 2 - HEAD_TOKENS = 22 content tokens kept from the end
# Before tokenizing, a text longer than CHAR_HEAD + CHAR_TAIL Unicode scalar values is cut to its
# first CHAR_HEAD and last CHAR_TAIL characters joined by "\n", so tokenization cost is bounded
# however long the prompt (the kept token head/tail come from these windows).
CHAR_HEAD, CHAR_TAIL = 512, 1024
CLS_ID, SEP_ID = 101, 102
HIDDEN = 384


# ---------------------------------------------------------------- what is scored
def scored_text(messages):
    """OpenAI chat messages -> the text the router scores.

    = content of every `system` or `developer` message (in order, joined by "\\n"), then "\\n\\n", then the
    content of the LAST `user` message. Without a system message: the last user message alone.
    Content given as a list of parts: the `text` of the parts with type "text", joined by "\\n".
    """
    def content(m):
        c = m.get("content") or ""
        if isinstance(c, list):
            c = "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        return c

    system = "\n".join(content(m) for m in messages if m.get("role") in ("system", "developer"))
    users = [content(m) for m in messages if m.get("role") == "user"]
    last_user = users[-1] if users else ""
    return f"{system}\n\n{last_user}" if system else last_user


# ---------------------------------------------------------------- tokenization
def load_tokenizer(path=TOKENIZER_PATH):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(path)
    tok.no_truncation()   # tokenizer.json ships truncation=128 and Fixed(128) padding: both OFF
    tok.no_padding()
    return tok


def truncate_ids(content_ids, max_tokens=MAX_TOKENS, head_tokens=HEAD_TOKENS):
    """Content token ids (no specials) -> [CLS] head ... tail [SEP], at most max_tokens long."""
    budget = max_tokens - 2
    if len(content_ids) > budget:
        tail = budget - head_tokens
        content_ids = content_ids[:head_tokens] + content_ids[len(content_ids) - tail:]
    return [CLS_ID] + list(content_ids) + [SEP_ID]


def char_window(text):
    if len(text) > CHAR_HEAD + CHAR_TAIL:
        return text[:CHAR_HEAD] + "\n" + text[len(text) - CHAR_TAIL:]
    return text


def encode(tok, text, max_tokens=MAX_TOKENS, head_tokens=HEAD_TOKENS):
    """Scored text -> model input ids: char window, WordPiece without specials, head+tail cut."""
    ids = tok.encode(char_window(text), add_special_tokens=False).ids
    return truncate_ids(ids, max_tokens, head_tokens)


# ---------------------------------------------------------------- encoder
def integer_kernels_exact():
    """Whether ONNX Runtime's uint8 x int8 products are exact on this CPU. On x86 without VNNI
    they go through `vpmaddubsw`, which saturates pairs of products at 16 bits; there the gateway
    runs model.onnx (float math) instead of encoder.onnx. Must agree with the Rust check."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _pinned_sha():
    """encoder_sha256 of head.json: the model.onnx the committed graph and heads were built on."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "head.json"), encoding="utf-8") as f:
        return json.load(f)["encoder_sha256"]


def check_weights(model_path=MODEL_PATH):
    """Exit with a message unless model_path is the pinned encoder (encoder.onnx reads its weights
    from it by byte offset, so another file would give wrong numbers, not an error)."""
    if not os.path.exists(model_path):
        sys.exit(f"{model_path} is missing: run `python fetch_models.py` (or `python3 scripts/provision.py`)")
    got = _file_sha(model_path)
    if got != _pinned_sha():
        sys.exit(f"{model_path} has sha256 {got}, not the pinned {_pinned_sha()} (head.json encoder_sha256): "
                 "run `python fetch_models.py` to restore it")


def served_graph():
    """The encoder graph the gateway runs here: encoder.onnx, or model.onnx (see above)."""
    return GRAPH_PATH if integer_kernels_exact() else MODEL_PATH


class Encoder:
    def __init__(self, model_path=None, threads=2, weights_dir=MODEL_DIR):
        """model_path: a file or the serialized graph (bytes); default: the graph served here.
        A graph with external data (encoder.onnx) reads its weights from `weights_dir`."""
        import onnxruntime as ort
        model_path = served_graph() if model_path is None else model_path
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if model_path == GRAPH_PATH:
            check_weights(os.path.join(weights_dir, "model.onnx"))
        if isinstance(model_path, str) and model_path != MODEL_PATH:
            with open(model_path, "rb") as f:
                model_path = f.read()
        if isinstance(model_path, bytes):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_dir)
        self.sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])

    def run(self, batch_ids):
        """List of token-id lists -> (hidden [B,T,384] float32, mask [B,T] int64); pad to longest."""
        (h,), mask = self.run_outputs(batch_ids, ["last_hidden_state"])
        return h, mask

    def run_outputs(self, batch_ids, names):
        """Like run, for the graph outputs `names` (layers_experiment.py adds inner layers)."""
        T = max(len(x) for x in batch_ids)
        ids = np.zeros((len(batch_ids), T), dtype=np.int64)
        mask = np.zeros((len(batch_ids), T), dtype=np.int64)
        for i, x in enumerate(batch_ids):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        outs = self.sess.run(names, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        return outs, mask


def pool(h, mask):
    """hidden [B,T,H], mask [B,T] -> mean [B,H], max [B,H], cls [B,H] over real tokens
    (incl. [CLS] and [SEP]; padding excluded)."""
    m = mask[:, :, None].astype(np.float32)
    mean = (h * m).sum(1) / m.sum(1)
    mx = np.where(m > 0, h, -np.inf).max(1)
    cls = h[:, 0, :]
    return mean.astype(np.float32), mx.astype(np.float32), cls.astype(np.float32)


def _file_sha(path):
    st = os.stat(path)
    return _sha_of(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _sha_of(path, mtime_ns, size):
    # Keyed by time and size too: model.onnx (22 MB) is hashed once per process, not once
    # for the cache key and again for the weights check, while an edited file is re-read.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embed_cached(texts, name, batch_size=32, threads=2, verbose=True,
                 max_tokens=MAX_TOKENS, head_tokens=HEAD_TOKENS, graph=None):
    """Pooled embeddings for `texts`, cached in $TIERGATE_CACHE/features/<name>-<key>.npz.
    graph: the encoder graph (default: the one served on this CPU; MODEL_PATH = the float one).
    Returns dict with 'mean', 'max', 'cls' [N,384] float32 and 'ntok' [N] (truncated length)."""
    graph = served_graph() if graph is None else graph
    key = hashlib.sha256()
    key.update(_file_sha(MODEL_PATH).encode())
    if graph != MODEL_PATH:
        key.update(_file_sha(graph).encode())
    key.update(_file_sha(TOKENIZER_PATH).encode())
    key.update(f"{max_tokens}/{head_tokens}/{CHAR_HEAD}/{CHAR_TAIL}".encode())
    for t in texts:
        key.update(hashlib.sha256(t.encode("utf-8")).digest())
    d = os.path.join(CACHE, "features")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}-{key.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {k: z[k] for k in z.files}
    tok = load_tokenizer()
    enc = Encoder(graph, threads=threads)
    ids = [encode(tok, t, max_tokens, head_tokens) for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")  # sort by length: little padding
    out = {k: np.zeros((len(texts), HIDDEN), np.float32) for k in ("mean", "max", "cls")}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        h, m = enc.run([ids[i] for i in idx])
        mean, mx, cls = pool(h, m)
        out["mean"][idx], out["max"][idx], out["cls"][idx] = mean, mx, cls
        if verbose and (s // batch_size) % 50 == 0:
            print(f"  {name}: {s}/{len(order)}", flush=True)
    out["ntok"] = np.array([len(x) for x in ids], np.float32)
    np.savez(path, **out)
    return out


# ---------------------------------------------------------------- hand features
# Tried and dropped (no gain in MMLU grouped CV, see README): digit share, number count, math
# operators, code markers, question marks, newlines, "hard"/"easy" keyword counts.
HAND_NAMES = ["log1p_chars"]


def hand_features(text):
    """Full scored text (NOT truncated) -> [ln(1 + number of Unicode scalar values)]."""
    return [math.log1p(len(text))]


def hand_matrix(texts):
    return np.array([hand_features(t) for t in texts], np.float32)
