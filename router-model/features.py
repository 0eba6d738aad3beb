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
import hashlib
import json
import math
import os
import re

import numpy as np

CACHE = os.environ.get("TIERGATE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tiergate"))
MODEL_DIR = os.path.join(CACHE, "models", "all-minilm-l6-v2-int8")
MODEL_PATH = os.path.join(MODEL_DIR, "model.onnx")
TOKENIZER_PATH = os.path.join(MODEL_DIR, "tokenizer.json")

MAX_TOKENS = 128          # total sequence length incl. [CLS] and [SEP]
HEAD_TOKENS = 32          # content tokens kept from the start when truncating
# tail = MAX_TOKENS - 2 - HEAD_TOKENS = 94 content tokens kept from the end
CLS_ID, SEP_ID = 101, 102
HIDDEN = 384


# ---------------------------------------------------------------- what is scored
def scored_text(messages):
    """OpenAI chat messages -> the text the router scores.

    = content of every `system` message (in order, joined by "\\n"), then "\\n\\n", then the
    content of the LAST `user` message. Without a system message: the last user message alone.
    Content given as a list of parts: the `text` of the parts with type "text", joined by "\\n".
    """
    def content(m):
        c = m.get("content") or ""
        if isinstance(c, list):
            c = "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        return c

    system = "\n".join(content(m) for m in messages if m.get("role") == "system")
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


def encode(tok, text, max_tokens=MAX_TOKENS, head_tokens=HEAD_TOKENS):
    return truncate_ids(tok.encode(text, add_special_tokens=False).ids, max_tokens, head_tokens)


# ---------------------------------------------------------------- encoder
class Encoder:
    def __init__(self, model_path=MODEL_PATH, threads=2):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])

    def run(self, batch_ids):
        """List of token-id lists -> (hidden [B,T,384] float32, mask [B,T] int64); pad to longest."""
        T = max(len(x) for x in batch_ids)
        ids = np.zeros((len(batch_ids), T), dtype=np.int64)
        mask = np.zeros((len(batch_ids), T), dtype=np.int64)
        for i, x in enumerate(batch_ids):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        h = self.sess.run(["last_hidden_state"], {
            "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        return h, mask


def pool(h, mask):
    """hidden [B,T,H], mask [B,T] -> mean [B,H], max [B,H], cls [B,H] over real tokens
    (incl. [CLS] and [SEP]; padding excluded)."""
    m = mask[:, :, None].astype(np.float32)
    mean = (h * m).sum(1) / m.sum(1)
    mx = np.where(m > 0, h, -np.inf).max(1)
    cls = h[:, 0, :]
    return mean.astype(np.float32), mx.astype(np.float32), cls.astype(np.float32)


def _file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embed_cached(texts, name, batch_size=32, threads=2, verbose=True,
                 max_tokens=MAX_TOKENS, head_tokens=HEAD_TOKENS):
    """Pooled embeddings for `texts`, cached in $TIERGATE_CACHE/features/<name>-<key>.npz.
    Returns dict with 'mean', 'max', 'cls' [N,384] float32 and 'ntok' [N] (truncated length)."""
    key = hashlib.sha256()
    key.update(_file_sha(MODEL_PATH).encode())
    key.update(_file_sha(TOKENIZER_PATH).encode())
    key.update(f"{max_tokens}/{head_tokens}".encode())
    for t in texts:
        key.update(hashlib.sha256(t.encode("utf-8")).digest())
    d = os.path.join(CACHE, "features")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}-{key.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {k: z[k] for k in z.files}
    tok = load_tokenizer()
    enc = Encoder(threads=threads)
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
# All regexes are ASCII-only on purpose, so that Python `re` and Rust `regex` agree.
RE_DIGIT = re.compile(r"[0-9]")
RE_NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")
RE_MATH = re.compile(r"[=+*/^<>%$]|\\frac|\\sqrt|\\sum|\\int")
RE_CODE = re.compile(r"```|[{};]|\bdef |\bfunction\b|\bclass |\breturn\b|#include|=>|->|\bSELECT\b|\bimport ")
RE_QMARK = re.compile(r"\?")
RE_NEWLINE = re.compile(r"\n")
RE_WORD = re.compile(r"[A-Za-z]+")
RE_HARD_WORDS = re.compile(
    r"\b(?:prove|proof|derive|optimi[sz]e|algorithm|complexity|design|architecture|debug|"
    r"implement|calculate|compute|solve|equation|probability|integral|theorem|step by step|"
    r"explain why|trade-?offs?|how many|what is the (?:value|probability|number))\b",
    re.IGNORECASE)
RE_EASY_WORDS = re.compile(
    r"\b(?:translate|summari[sz]e|rewrite|rephrase|format|list|convert|extract|"
    r"fix the grammar|proofread|shorten|bullet points?|table|json|email|tl;?dr)\b",
    re.IGNORECASE)

HAND_NAMES = [
    "log1p_chars", "log1p_words", "digit_frac", "log1p_numbers", "math_ops_per_100c",
    "code_marks_per_100c", "log1p_qmarks", "log1p_newlines", "log1p_hard_words", "log1p_easy_words",
]


def hand_features(text):
    """Full scored text (NOT truncated) -> list of len(HAND_NAMES) floats. chars = Unicode scalars."""
    n = len(text)
    per100 = 100.0 / max(n, 1)
    return [
        math.log1p(n),
        math.log1p(len(RE_WORD.findall(text))),
        len(RE_DIGIT.findall(text)) / max(n, 1),
        math.log1p(len(RE_NUMBER.findall(text))),
        len(RE_MATH.findall(text)) * per100,
        len(RE_CODE.findall(text)) * per100,
        math.log1p(len(RE_QMARK.findall(text))),
        math.log1p(len(RE_NEWLINE.findall(text))),
        math.log1p(len(RE_HARD_WORDS.findall(text))),
        math.log1p(len(RE_EASY_WORDS.findall(text))),
    ]


def hand_matrix(texts):
    return np.array([hand_features(t) for t in texts], np.float32)
