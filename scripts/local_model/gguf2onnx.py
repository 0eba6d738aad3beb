#!/usr/bin/env python3
"""Lean GGUF -> ONNX converter (numpy + onnx + gguf; no torch, no transformers).

Produces a decoder-only model in the Hugging Face Optimum ONNX layout with KV cache:

  inputs : input_ids                 int64   [batch, seq]
           attention_mask            int64   [batch, past + seq]
           position_ids              int64   [batch, seq]
           past_key_values.{i}.key   float32 [batch, n_kv_heads, past, head_dim]
           past_key_values.{i}.value float32 [batch, n_kv_heads, past, head_dim]
  outputs: logits                    float32 [batch, seq, vocab]
           present.{i}.key           float32 [batch, n_kv_heads, past + seq, head_dim]
           present.{i}.value         float32 [batch, n_kv_heads, past + seq, head_dim]
           last_hidden_state         float32 [batch, seq, hidden]  (the final norm's output:
                                     what a draft head reads; costs nothing to return)

Supported GGUF architectures: `llama` (e.g. SmolLM2) and `qwen2` (e.g. Qwen2.5).

GGUF specifics handled here:
  * llama.cpp's HF->GGUF converter permutes the rows of Q and K for the `llama` arch
    (so that its "normal" rotary mode, which rotates interleaved pairs, matches HF's
    rotate_half).  We undo that permutation and use HF's rotate_half rotary.  `qwen2` is
    converted without the permutation (llama.cpp uses NEOX rotary for it), so nothing to undo.
    `verify_against_reference` checks this numerically against a numpy forward pass that
    follows llama.cpp's conventions on the raw GGUF tensors.
  * RMSNorm epsilon, rope theta, head counts (GQA) come from the GGUF metadata.
  * qwen2 has q/k/v biases.
  * tied embeddings: when `output.weight` is absent, `token_embd.weight` is the LM head.

The fp32 graph stores every weight as ONNX external data (one file `<name>.onnx_data`),
written incrementally so peak memory stays near one copy of the weights.  The token
embedding table is stored as float16 (Gather + Cast), which halves its size at no
measurable cost.  `quantize()` then produces the CPU model (see README.md for the choice).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import gguf
import gguf_nbits

OPSET = 17


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# GGUF reading
# --------------------------------------------------------------------------------------
class GGUFModel:
    def __init__(self, path: str):
        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.field("general.architecture")
        if self.arch not in ("llama", "qwen2"):
            raise SystemExit(f"unsupported GGUF architecture {self.arch!r} (llama, qwen2 only)")
        a = self.arch
        self.n_layers = int(self.field(f"{a}.block_count"))
        self.hidden = int(self.field(f"{a}.embedding_length"))
        self.ffn = int(self.field(f"{a}.feed_forward_length"))
        self.n_heads = int(self.field(f"{a}.attention.head_count"))
        self.n_kv_heads = int(self.field(f"{a}.attention.head_count_kv", self.n_heads))
        self.eps = float(self.field(f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_theta = float(self.field(f"{a}.rope.freq_base", 10000.0))
        self.ctx = int(self.field(f"{a}.context_length"))
        self.head_dim = int(self.field(f"{a}.attention.key_length", self.hidden // self.n_heads))
        rope_dim = int(self.field(f"{a}.rope.dimension_count", self.head_dim))
        if rope_dim != self.head_dim:
            raise SystemExit(f"partial rotary ({rope_dim} of {self.head_dim}) not supported")
        if self.field(f"{a}.rope.scaling.type", "none") not in ("none", None):
            raise SystemExit("rope scaling not supported")
        self.vocab = int(self.tensors["token_embd.weight"].shape[1])
        self.tied = "output.weight" not in self.tensors

    def field(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if t == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]

    def weight(self, name: str) -> np.ndarray:
        """Dequantized tensor in PyTorch layout ([out, in] for linear weights), float32."""
        t = self.tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.array(t.data, dtype=np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            a = np.array(t.data, dtype=np.float16).astype(np.float32)
        else:
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return a.reshape(shape)

    def qk_weight(self, name: str, n_heads: int) -> np.ndarray:
        """Q or K weight/bias in HF layout (undoes llama.cpp's rotary permutation for llama)."""
        w = self.weight(name)
        if self.arch == "llama":
            w = unpermute_qk(w, n_heads)
        return w


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf.LlamaModel.permute (rows: heads x 2 x hd/2)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF rotate_half rows -> interleaved pairs); for tests."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


# --------------------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------------------
class ExternalWriter:
    """Writes initializers straight into one external-data file."""

    def __init__(self, onnx_path: str):
        self.location = os.path.basename(onnx_path) + "_data"
        self.path = os.path.join(os.path.dirname(onnx_path), self.location)
        self.f = open(self.path, "wb")
        self.offset = 0
        self.inits: list[TensorProto] = []

    def add(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        pad = (-self.offset) % 64  # keep tensors aligned
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)),
                     ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.f.write(arr.tobytes())
        self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def close(self):
        self.f.close()


class G:
    """Tiny helper to emit nodes with unique names."""

    def __init__(self, w: ExternalWriter):
        self.nodes: list = []
        self.w = w
        self.n = 0
        self.consts: dict = {}

    def op(self, op_type, inputs, n_out=1, name=None, domain=None, **attrs):
        self.n += 1
        base = name or f"{op_type}_{self.n}"
        outs = [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.array(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            name = f"const_{len(self.consts)}"
            self.w.inits.append(numpy_helper.from_array(arr, name))
            self.consts[key] = name
        return self.consts[key]


def rms_norm(g: G, x: str, weight: str, eps: float, name: str) -> str:
    # x / sqrt(mean(x^2) + eps) * w  -- the pattern ORT fuses into SimplifiedLayerNormalization
    sq = g.op("Pow", [x, g.const(2.0, np.float32)], name=f"{name}/Pow")
    ms = g.op("ReduceMean", [sq], name=f"{name}/ReduceMean", axes=[-1], keepdims=1)
    ad = g.op("Add", [ms, g.const(eps, np.float32)], name=f"{name}/Add")
    sr = g.op("Sqrt", [ad], name=f"{name}/Sqrt")
    dv = g.op("Div", [x, sr], name=f"{name}/Div")
    return g.op("Mul", [dv, weight], name=f"{name}/Mul")


def rotate(g: G, x: str, cos: str, sin: str, half: int, name: str) -> str:
    # HF rotate_half: x*cos + cat(-x2, x1)*sin
    x1, x2 = g.op("Split", [x, g.const([half, half])], n_out=2, name=f"{name}/Split", axis=-1)
    nx2 = g.op("Neg", [x2], name=f"{name}/Neg")
    rh = g.op("Concat", [nx2, x1], name=f"{name}/Concat", axis=-1)
    a = g.op("Mul", [x, cos], name=f"{name}/MulCos")
    b = g.op("Mul", [rh, sin], name=f"{name}/MulSin")
    return g.op("Add", [a, b], name=f"{name}/Add")


def linear_nbits(g: G, x: str, d, k: int, name: str) -> str:
    """x @ W^T for GGUF weights decomposed by gguf_nbits: 4-bit terms plus block constants."""
    out = None
    for i, t in enumerate(d.terms):
        packed, scales, zps = gguf_nbits.pack(t)
        ins = [x, g.w.add(f"{name}.q{i}", packed), g.w.add(f"{name}.scales{i}", scales),
               g.w.add(f"{name}.zero_points{i}", zps)]
        y = g.op("MatMulNBits", ins, name=f"{name}/MatMulNBits{i}", domain="com.microsoft",
                 K=k, N=t.codes.shape[0], bits=4, block_size=t.block, accuracy_level=0)
        out = y if out is None else g.op("Add", [out, y], name=f"{name}/AddTerm{i}")
    if d.consts is not None:
        blocks = g.op("Reshape", [x, g.const([0, 0, k // 32, 32])], name=f"{name}/Blocks")
        sums = g.op("ReduceSum", [blocks, g.const([-1])], name=f"{name}/BlockSum", keepdims=0)
        c = g.op("MatMul", [sums, g.w.add(f"{name}.block_consts", d.consts.T)], name=f"{name}/BlockConsts")
        out = g.op("Add", [out, c], name=f"{name}/AddConsts")
    return out


def build_onnx(m: GGUFModel, out_path: str, progress=log, weights: str = "fp32", exact_rows: bool = False) -> None:
    """weights: "fp32" (dequantized MatMul weights, to be quantized afterwards) or "gguf4"
    (the GGUF's own block-quantized weights as exact 4-bit MatMulNBits terms, see gguf_nbits).

    exact_rows: attention as one GEMM per query row (QK: [1,hd]x[hd,T]; PV: [hd,T]x[T,1]), so a
    row of a multi-token pass computes bit for bit what a one-token pass computes for that token.
    MLAS's multi-row QK GEMM rounds differently from its one-row GEMM, and [1,T]x[T,hd] sums the
    keys in an order that changes when masked keys (p = 0) are appended; these two forms don't
    (checked in Python, ORT 1.31). With per-row activation quantization (quantize.py `row8`)
    this makes speculative verification give plain greedy decoding's tokens."""
    t0 = time.time()
    w = ExternalWriter(out_path)
    g = G(w)
    exact4 = weights == "gguf4"

    def matmul(x: str, tensor: str, name: str, init: str, n_heads_for_perm=None) -> str:
        # x [B,S,K] @ W^T with W the GGUF tensor [N, K] (q/k rows un-permuted for llama)
        t = m.tensors[tensor]
        if exact4 and t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            d = gguf_nbits.decompose(t)
            gguf_nbits.check(d, m.weight(tensor), tensor)
            if n_heads_for_perm is not None and m.arch == "llama":
                d = gguf_nbits.permute_rows(d, lambda a: unpermute_qk(a, n_heads_for_perm))
            return linear_nbits(g, x, d, int(t.shape[0]), name)
        wt = m.qk_weight(tensor, n_heads_for_perm) if n_heads_for_perm is not None else m.weight(tensor)
        return g.op("MatMul", [x, w.add(init, wt.T)], name=f"{name}/MatMul")
    H, nh, nkv, hd = m.hidden, m.n_heads, m.n_kv_heads, m.head_dim
    rep = nh // nkv
    V = m.vocab

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V]),
               helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", H])]
    for i in range(m.n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", nkv, "past_sequence_length", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", nkv, "total_sequence_length", hd]))

    # --- embeddings (float16 table, Gather, Cast) ---
    emb = m.weight("token_embd.weight")  # [V, H]
    w.add("model.embed_tokens.weight", emb.astype(np.float16))
    h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], name="embed/Gather", axis=0)
    h = g.op("Cast", [h], name="embed/Cast", to=TensorProto.FLOAT)
    if m.tied and not exact4:
        lm_head = emb.T.copy()
    del emb

    # --- rotary tables from position_ids ---
    inv_freq = 1.0 / (m.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    w.inits.append(numpy_helper.from_array(inv_freq.astype(np.float32), "rope/inv_freq"))
    posf = g.op("Cast", ["position_ids"], name="rope/Cast", to=TensorProto.FLOAT)
    posf = g.op("Unsqueeze", [posf, g.const([-1])], name="rope/Unsqueeze")
    freqs = g.op("Mul", [posf, "rope/inv_freq"], name="rope/Mul")  # [B,S,hd/2]
    embf = g.op("Concat", [freqs, freqs], name="rope/Concat", axis=-1)  # [B,S,hd]
    cos = g.op("Unsqueeze", [g.op("Cos", [embf], name="rope/Cos"), g.const([1])], name="rope/UnsqCos")
    sin = g.op("Unsqueeze", [g.op("Sin", [embf], name="rope/Sin"), g.const([1])], name="rope/UnsqSin")

    # --- additive attention bias: causal (offset by past) AND attention_mask ---
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"], name="mask/ShapeIds"), g.const(1)], name="mask/S", axis=0)
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"], name="mask/ShapeMask"), g.const(1)], name="mask/T", axis=0)
    p_len = g.op("Sub", [t_len, s_len], name="mask/P")
    rows = g.op("Range", [p_len, t_len, g.const(1)], name="mask/Rows")          # query positions [S]
    cols = g.op("Range", [g.const(0), t_len, g.const(1)], name="mask/Cols")     # key positions [T]
    rows = g.op("Unsqueeze", [rows, g.const([1])], name="mask/RowsU")            # [S,1]
    causal = g.op("LessOrEqual", [cols, rows], name="mask/Causal")               # [S,T]
    pad = g.op("Cast", ["attention_mask"], name="mask/PadBool", to=TensorProto.BOOL)
    pad = g.op("Unsqueeze", [pad, g.const([1, 2, 3])], name="mask/PadU")         # [B,1,1,1,T]
    allowed = g.op("And", [causal, pad], name="mask/And")                        # [B,1,1,S,T]
    bias = g.op("Where", [allowed, g.const(0.0, np.float32),
                          g.const(np.finfo(np.float32).min, np.float32)], name="mask/Bias")

    scale = 1.0 / np.sqrt(hd)
    for i in range(m.n_layers):
        p = f"model.layers.{i}"
        b = f"blk.{i}"
        attn_norm = w.add(f"{p}.input_layernorm.weight", m.weight(f"{b}.attn_norm.weight"))
        x = rms_norm(g, h, attn_norm, m.eps, f"/{p}/input_layernorm")

        def proj(name, tensor, n_heads_for_perm=None, bias_name=None):
            y = matmul(x, tensor, f"/{p}/{name}", f"{p}.{name}.weight", n_heads_for_perm)
            if bias_name is not None and bias_name in m.tensors:
                if n_heads_for_perm is not None:
                    bb = m.qk_weight(bias_name, n_heads_for_perm)
                else:
                    bb = m.weight(bias_name)
                y = g.op("Add", [y, w.add(f"{p}.{name}.bias", bb)], name=f"/{p}/{name}/Add")
            return y

        q = proj("self_attn.q_proj", f"{b}.attn_q.weight", nh, f"{b}.attn_q.bias")
        k = proj("self_attn.k_proj", f"{b}.attn_k.weight", nkv, f"{b}.attn_k.bias")
        v = proj("self_attn.v_proj", f"{b}.attn_v.weight", None, f"{b}.attn_v.bias")
        a = f"/{p}/self_attn"
        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nh, hd])], name=f"{a}/q/Reshape")],
                 name=f"{a}/q/Transpose", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, nkv, hd])], name=f"{a}/k/Reshape")],
                 name=f"{a}/k/Transpose", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, nkv, hd])], name=f"{a}/v/Reshape")],
                 name=f"{a}/v/Transpose", perm=[0, 2, 1, 3])
        q = rotate(g, q, cos, sin, hd // 2, f"{a}/q/rope")
        k = rotate(g, k, cos, sin, hd // 2, f"{a}/k/rope")
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [pk],
                                        name=f"{a}/present_key", axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [pv],
                                        name=f"{a}/present_value", axis=2))
        # grouped-query attention without materialising repeated KV:
        # q [B,nh,S,hd] -> [B,nkv,rep,S,hd];  k,v [B,nkv,T,hd] -> [B,nkv,1,T,hd]
        qs = g.op("Mul", [q, g.const(scale, np.float32)], name=f"{a}/q/Scale")
        q5 = g.op("Reshape", [qs, g.const([0, nkv, rep, -1, hd])], name=f"{a}/q/Reshape5")
        k5 = g.op("Unsqueeze", [pk, g.const([2])], name=f"{a}/k/Unsqueeze")
        v5 = g.op("Unsqueeze", [pv, g.const([2])], name=f"{a}/v/Unsqueeze")
        kt = g.op("Transpose", [k5], name=f"{a}/k/TransposeT", perm=[0, 1, 2, 4, 3])
        if exact_rows:
            q6 = g.op("Unsqueeze", [q5, g.const([4])], name=f"{a}/q/Unsqueeze6")      # [B,nkv,rep,S,1,hd]
            k6 = g.op("Unsqueeze", [kt, g.const([3])], name=f"{a}/k/Unsqueeze6")      # [B,nkv,1,1,hd,T]
            sc = g.op("MatMul", [q6, k6], name=f"{a}/QK")                              # [B,nkv,rep,S,1,T]
            sc = g.op("Squeeze", [sc, g.const([4])], name=f"{a}/QK/Squeeze")
        else:
            sc = g.op("MatMul", [q5, kt], name=f"{a}/QK")
        sc = g.op("Add", [sc, bias], name=f"{a}/Bias")
        pr = g.op("Softmax", [sc], name=f"{a}/Softmax", axis=-1)
        if exact_rows:
            p6 = g.op("Unsqueeze", [pr, g.const([-1])], name=f"{a}/p/Unsqueeze6")     # [B,nkv,rep,S,T,1]
            vt = g.op("Transpose", [v5], name=f"{a}/v/TransposeT", perm=[0, 1, 2, 4, 3])
            v6 = g.op("Unsqueeze", [vt, g.const([3])], name=f"{a}/v/Unsqueeze6")      # [B,nkv,1,1,hd,T]
            o = g.op("MatMul", [v6, p6], name=f"{a}/PV")                               # [B,nkv,rep,S,hd,1]
            o = g.op("Squeeze", [o, g.const([-1])], name=f"{a}/PV/Squeeze")           # [B,nkv,rep,S,hd]
        else:
            o = g.op("MatMul", [pr, v5], name=f"{a}/PV")                       # [B,nkv,rep,S,hd]
        o = g.op("Reshape", [o, g.const([0, nh, -1, hd])], name=f"{a}/o/Reshape4")
        o = g.op("Transpose", [o], name=f"{a}/o/Transpose", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.const([0, 0, nh * hd])], name=f"{a}/o/Reshape")
        o = matmul(o, f"{b}.attn_output.weight", f"{a}/o_proj", f"{p}.self_attn.o_proj.weight")
        h = g.op("Add", [h, o], name=f"/{p}/attn_residual")

        ffn_norm = w.add(f"{p}.post_attention_layernorm.weight", m.weight(f"{b}.ffn_norm.weight"))
        x = rms_norm(g, h, ffn_norm, m.eps, f"/{p}/post_attention_layernorm")
        f = f"/{p}/mlp"
        gt = matmul(x, f"{b}.ffn_gate.weight", f"{f}/gate_proj", f"{p}.mlp.gate_proj.weight")
        up = matmul(x, f"{b}.ffn_up.weight", f"{f}/up_proj", f"{p}.mlp.up_proj.weight")
        act = g.op("Mul", [gt, g.op("Sigmoid", [gt], name=f"{f}/act/Sigmoid")], name=f"{f}/act/Mul")
        y = matmul(g.op("Mul", [act, up], name=f"{f}/Mul"), f"{b}.ffn_down.weight", f"{f}/down_proj",
                   f"{p}.mlp.down_proj.weight")
        h = g.op("Add", [h, y], name=f"/{p}/mlp_residual")
        progress(f"  layer {i + 1}/{m.n_layers} dequantized ({time.time() - t0:.1f}s)")

    norm = w.add("model.norm.weight", m.weight("output_norm.weight"))
    h = rms_norm(g, h, norm, m.eps, "/model/norm")
    g.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/model/norm/Identity"))
    if exact4:
        logits = matmul(h, "output.weight" if not m.tied else "token_embd.weight", "/lm_head", "lm_head.weight")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/lm_head/Identity"))
    else:
        if not m.tied:
            lm_head = m.weight("output.weight").T.copy()
        w.add("lm_head.weight", lm_head)
        del lm_head
        g.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="/lm_head/MatMul"))
    w.close()

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=w.inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if exact4 else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="tiergate-gguf2onnx")
    model.ir_version = 8
    onnx.save_model(model, out_path)
    onnx.checker.check_model(out_path)
    progress(f"  wrote {out_path} (+{w.location}, {w.offset / 2**20:.0f} MiB) in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------
# Model config files
# --------------------------------------------------------------------------------------
def write_configs(m: GGUFModel, out_dir: str, stop_ids: list[int]) -> None:
    model_type = {"llama": "llama", "qwen2": "qwen2"}[m.arch]
    cfg = {
        "architectures": ["LlamaForCausalLM" if m.arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": model_type,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_size": m.hidden,
        "intermediate_size": m.ffn,
        "vocab_size": m.vocab,
        "max_position_embeddings": m.ctx,
        "rms_norm_eps": m.eps,
        "rope_theta": m.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tied,
        "bos_token_id": m.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
        "tiergate_source": {"gguf_name": m.field("general.name"), "gguf_arch": m.arch,
                            "gguf_file_type": m.field("general.file_type")},
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = {
        "bos_token_id": m.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stop_ids,
        "pad_token_id": m.field("tokenizer.ggml.padding_token_id"),
        "do_sample": False,
        "max_new_tokens": 512,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


# --------------------------------------------------------------------------------------
# numpy reference forward pass that follows llama.cpp conventions on the raw GGUF tensors
# --------------------------------------------------------------------------------------
def reference_logits(m: GGUFModel, ids: list[int]) -> np.ndarray:
    """Single-sequence full forward in float64-ish numpy, llama.cpp semantics:
    llama arch -> 'normal' rope (rotates adjacent pairs) on the raw (permuted) Q/K rows,
    qwen2 arch -> NEOX rope (rotates halves) on the raw Q/K rows."""
    H, nh, nkv, hd = m.hidden, m.n_heads, m.n_kv_heads, m.head_dim
    S = len(ids)
    emb = m.weight("token_embd.weight")
    x = emb[ids].astype(np.float32)
    pos = np.arange(S)[:, None]
    inv = 1.0 / (m.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = pos * inv[None, :]                          # [S, hd/2]
    c, s = np.cos(ang), np.sin(ang)

    def rope(t):  # t [S, heads, hd]
        if m.arch == "llama":   # adjacent pairs (x0,x1),(x2,x3)...
            x0, x1 = t[..., 0::2], t[..., 1::2]
            out = np.empty_like(t)
            out[..., 0::2] = x0 * c[:, None] - x1 * s[:, None]
            out[..., 1::2] = x0 * s[:, None] + x1 * c[:, None]
            return out
        x0, x1 = t[..., : hd // 2], t[..., hd // 2:]
        return np.concatenate([x0 * c[:, None] - x1 * s[:, None], x0 * s[:, None] + x1 * c[:, None]], -1)

    def norm(t, wt):
        return t / np.sqrt((t * t).mean(-1, keepdims=True) + m.eps) * wt

    mask = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(m.n_layers):
        b = f"blk.{i}"
        xn = norm(x, m.weight(f"{b}.attn_norm.weight"))

        def lin(name, bias=None):
            y = xn @ m.weight(name).T
            if bias and bias in m.tensors:
                y = y + m.weight(bias)
            return y
        q = rope(lin(f"{b}.attn_q.weight", f"{b}.attn_q.bias").reshape(S, nh, hd))
        k = rope(lin(f"{b}.attn_k.weight", f"{b}.attn_k.bias").reshape(S, nkv, hd))
        v = lin(f"{b}.attn_v.weight", f"{b}.attn_v.bias").reshape(S, nkv, hd)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        sc = np.einsum("shd,thd->hst", q, k) / np.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = np.einsum("hst,thd->shd", sc, v).reshape(S, nh * hd)
        x = x + o @ m.weight(f"{b}.attn_output.weight").T
        xn = norm(x, m.weight(f"{b}.ffn_norm.weight"))
        gt = xn @ m.weight(f"{b}.ffn_gate.weight").T
        up = xn @ m.weight(f"{b}.ffn_up.weight").T
        x = x + (gt / (1 + np.exp(-gt)) * up) @ m.weight(f"{b}.ffn_down.weight").T
    x = norm(x, m.weight("output_norm.weight"))
    head = emb if m.tied else m.weight("output.weight")
    return x @ head.T


def verify_against_reference(m: GGUFModel, onnx_path: str, ids: list[int], progress=log) -> float:
    import onnxruntime as ort
    ref = reference_logits(m, ids)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    S = len(ids)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.arange(S, dtype=np.int64)[None]}
    for i in range(m.n_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, m.n_kv_heads, 0, m.head_dim), np.float32)
    got = sess.run(["logits"], feeds)[0][0]
    diff = float(np.abs(got - ref).max())
    same_argmax = bool((got.argmax(-1) == ref.argmax(-1)).all())
    progress(f"  reference check: max |onnx - numpy(llama.cpp conventions)| = {diff:.2e}, "
             f"argmax equal at all {S} positions: {same_argmax}")
    if not same_argmax or diff > 1e-2 * max(1.0, float(np.abs(ref).max())):
        raise SystemExit("ONNX graph does not match the reference forward pass")
    return diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--name", default="model_fp32.onnx")
    ap.add_argument("--verify", action="store_true", help="compare with the numpy llama.cpp-convention reference")
    ap.add_argument("--exact-rows", action="store_true", help="attention one product per query row (for quantize.py row8)")
    # also writes tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    # generation_config.json and config.json next to the graph
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    m = GGUFModel(args.gguf)
    log(f"{m.arch}: layers={m.n_layers} hidden={m.hidden} heads={m.n_heads}/{m.n_kv_heads} "
        f"head_dim={m.head_dim} vocab={m.vocab} tied={m.tied} eps={m.eps} theta={m.rope_theta}")
    import gguf_tokenizer
    info = gguf_tokenizer.write_tokenizer(m, args.out_dir)
    gguf_tokenizer.verify(os.path.join(args.out_dir, "tokenizer.json"), info, log=log)
    write_configs(m, args.out_dir, info["stop_token_ids"])
    out = os.path.join(args.out_dir, args.name)
    build_onnx(m, out, exact_rows=args.exact_rows)
    if args.verify:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.out_dir, "tokenizer.json"))
        ids = tok.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n", add_special_tokens=False).ids
        verify_against_reference(m, out, ids)


if __name__ == "__main__":
    main()
