#!/usr/bin/env python3
"""Quantize an fp32 Optimum-layout decoder graph for CPU, and compare variants.

  quantize.py MODEL_DIR --method nbits4 [--block-size 32] [--accuracy-level 4]
  quantize.py MODEL_DIR --method int8dyn
  quantize.py MODEL_DIR --compare model_a.onnx model_b.onnx ...   # quality vs model_fp32.onnx
  quantize.py MODEL_DIR --compare ... --one-token                 # the same, one token per pass

Methods:
  int8dyn  onnxruntime.quantization.quantize_dynamic, MatMul only, per-channel int8 weights,
           activations quantized at run time (MatMulInteger / DynamicQuantizeMatMul).
  nbits4   MatMulNBitsQuantizer, 4-bit blockwise asymmetric weights (com.microsoft.MatMulNBits).
  nbits8   MatMulNBitsQuantizer, 8-bit blockwise asymmetric weights.
  row8     int8 per-column weights, activations quantized per ROW at run time (asymmetric
           uint8; down_proj per --block-size block of a row), integer MatMulInteger: a row's numbers
           never depend on the other rows of the pass. On a graph built with gguf2onnx's
           exact_rows attention, a multi-token pass gives every row the logits of a one-token
           pass bit for bit, so speculative decoding returns plain greedy's tokens (and rows
           of a batch would not disturb each other).

Only MatMul weights are quantized; the token embedding is already float16 (Gather + Cast).
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import onnx

QUALITY_TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as the centerpiece "
    "of the 1889 World's Fair.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nif __name__ == \"__main__\":\n"
    "    for i in range(10):\n        print(i, fibonacci(i))\n",
]


def quantize(model_dir: str, method: str, src: str = "model_fp32.onnx", dst: str | None = None,
             block_size: int = 32, accuracy_level: int | None = 4, log=print) -> str:
    logging.disable(logging.WARNING)  # the ORT quantizers log every node at INFO/WARNING
    try:
        return _quantize(model_dir, method, src, dst, block_size, accuracy_level, log)
    finally:
        logging.disable(logging.NOTSET)


def _quantize(model_dir, method, src, dst, block_size, accuracy_level, log):
    src_path = os.path.join(model_dir, src)
    dst = dst or f"model_{method}.onnx"
    dst_path = os.path.join(model_dir, dst)
    t0 = time.time()
    if method == "int8dyn":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(src_path, dst_path, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    elif method in ("hybrid4", "hybrid8"):
        # int8 dynamic (MatMulInteger, fast prefill) for every projection except mlp.down_proj,
        # whose input has large outliers that per-tensor activation quantization destroys;
        # down_proj gets MatMulNBits (accuracy_level 4 quantizes activations per 32-block).
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        g = onnx.load(src_path, load_external_data=False).graph
        down = [n.name for n in g.node if n.op_type == "MatMul" and "down_proj" in n.name]
        tmp = dst_path + ".tmp.onnx"
        quantize_dynamic(src_path, tmp, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True, nodes_to_exclude=down,
                         extra_options={"MatMulConstBOnly": True})
        model = onnx.load(tmp, load_external_data=True)
        q = MatMulNBitsQuantizer(model, bits=4 if method == "hybrid4" else 8, block_size=block_size,
                                 is_symmetric=False, accuracy_level=accuracy_level,
                                 nodes_to_include=down, op_types_to_quantize=("MatMul",))
        q.process()
        del model
        _save(q.model.model, dst_path)
        for f in (tmp, tmp + ".data"):
            if os.path.exists(f):
                os.remove(f)
    elif method == "row8":
        _row8(src_path, dst_path, block_size)
    elif method in ("nbits4", "nbits8"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        model = onnx.load(src_path, load_external_data=True)
        q = MatMulNBitsQuantizer(model, bits=4 if method == "nbits4" else 8, block_size=block_size,
                                 is_symmetric=False, accuracy_level=accuracy_level,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        del model
        out = q.model.model
        _save(out, dst_path)
    else:
        raise SystemExit(f"unknown method {method}")
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f in (dst, dst + "_data", dst + ".data"))
    log(f"  quantized ({method}) -> {dst} ({size / 2**20:.0f} MiB) in {time.time() - t0:.1f}s")
    return dst_path


def _row8(src_path: str, dst_path: str, block_size: int) -> None:
    """Every MatMul with a constant weight W [K, N] becomes integer arithmetic whose result for
    a row depends on that row only. Weights: int8, symmetric per column (w_scale [N]).
    Activations x [.., K], per row, asymmetric like DynamicQuantizeLinear but with one scale and
    zero point per row instead of per tensor:
        s = (max(x, 0) - min(x, 0)) / 255;  zp = round(-min(x, 0) / s);  q = uint8(round(x / s) + zp)
        y = float(MatMulInteger(q, W8) - zp * colsum(W8)) * s * w_scale
    (ORT's MatMulInteger takes only a scalar zero point, hence the colsum term; all int32, exact.)
    mlp.down_proj, whose input has outlier channels, is quantized per block_size-wide block of K
    instead of per row (the role 8-bit block-32 MatMulNBits plays in hybrid8), laid out [B, blocks, S, bs]
    so the integer GEMM runs per block and the block sum (ReduceSum over blocks) is the same
    for every row. One quantization chain per distinct input (q/k/v share one, gate/up another)."""
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(src_path, load_external_data=True)
    g = model.graph
    weights = {i.name: i for i in g.initializer}
    nodes, added, dropped, chains = [], [], set(), {}

    def const(name, arr):
        added.append(numpy_helper.from_array(arr, name))
        return name

    zero = const("row8/zero", np.array(0.0, np.float32))
    f255 = const("row8/f255", np.array(255.0, np.float32))
    inv255 = const("row8/inv255", np.array(1.0 / 255, np.float32))
    tiny = const("row8/tiny", np.array(1e-12, np.float32))  # an all-zero row: scale > 0

    def op(p, op_type, inputs, suffix, **attrs):
        """One node named and output `{p}/{suffix}`."""
        nodes.append(helper.make_node(op_type, inputs, [f"{p}/{suffix}"], name=f"{p}/{suffix}", **attrs))
        return f"{p}/{suffix}"

    def quant_chain(x, p):
        """uint8 codes, float scale and int32 zero point per slice of x's last axis."""
        hi = op(p, "Max", [op(p, "ReduceMax", [x], "ReduceMax", axes=[-1], keepdims=1), zero], "Hi")
        lo = op(p, "Min", [op(p, "ReduceMin", [x], "ReduceMin", axes=[-1], keepdims=1), zero], "Lo")
        s = op(p, "Mul", [op(p, "Max", [op(p, "Sub", [hi, lo], "Range"), tiny], "RangePos"), inv255], "Scale")
        zp = op(p, "Round", [op(p, "Div", [op(p, "Neg", [lo], "NegLo"), s], "ZpDiv")], "Zp")
        code = op(p, "Add", [op(p, "Round", [op(p, "Div", [x, s], "Div")], "Round"), zp], "Shift")
        q = op(p, "Cast", [op(p, "Clip", [code, zero, f255], "Clip")], "Quant", to=TensorProto.UINT8)
        return q, s, op(p, "Cast", [zp], "ZpInt", to=TensorProto.INT32)

    def int_matmul(n, q, s, zpi, w8, colsum):
        """float(q @ w8 - zp * colsum) * s, before the column scale."""
        centered = op(n, "Sub", [op(n, "MatMulInteger", [q, w8], "Int"), op(n, "Mul", [zpi, colsum], "ZpCol")],
                      "Centered")
        return op(n, "Mul", [op(n, "Cast", [centered], "Float", to=TensorProto.FLOAT), s], "RowScaled")

    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        x, wname = node.input
        n = node.name or node.output[0]
        w = numpy_helper.to_array(weights[wname]).astype(np.float32)
        dropped.add(wname)
        k, cols = w.shape
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        w8 = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        ws = const(f"{wname}/scale", w_scale)
        if "lm_head" in n:
            # [S, vocab] temporaries dominate prefill memory (0.6 MB a token each for Qwen),
            # so the LM head takes the short path: symmetric per-row codes (uint8 + scalar zero
            # point 128) and one fused integer GEMM with the column scales, then the row scale.
            amax = op(n, "ReduceMax", [op(n, "Abs", [x], "Abs")], "ReduceMax", axes=[-1], keepdims=1)
            s = op(n, "Mul", [op(n, "Max", [amax, tiny], "MaxPos"), const(f"{n}/inv127", np.array(1.0 / 127, np.float32))],
                   "Scale")
            code = op(n, "Add", [op(n, "Round", [op(n, "Div", [x, s], "Div")], "Round"),
                                 const(f"{n}/c128", np.array(128.0, np.float32))], "Shift")
            q = op(n, "Cast", [code], "Quant", to=TensorProto.UINT8)
            y = op(n, "MatMulIntegerToFloat", [q, const(f"{wname}/int8", w8), const(f"{n}/one", np.array(1.0, np.float32)),
                                               ws, const(f"{n}/zp128", np.array(128, np.uint8))],
                   "MatMulIntegerToFloat", domain="com.microsoft")
            nodes.append(helper.make_node("Mul", [y, s], [node.output[0]], name=f"{n}/RowScale"))
            continue
        block = next((b for b in (block_size, 128, 64, 32) if k % b == 0), 0) if "down_proj" in n else 0
        if block:
            nb = k // block
            xb = op(n, "Transpose", [op(n, "Reshape", [x, const(f"{n}/BlockShape", np.array([0, 0, nb, block]))],
                                        "Blocks0")], "Blocks", perm=[0, 2, 1, 3])   # [B,nb,S,bs]
            q, s, zpi = quant_chain(xb, f"{n}/quant")
            wb = w8.reshape(nb, block, cols)
            y = int_matmul(n, q, s, zpi, const(f"{wname}/int8", wb),
                           const(f"{wname}/colsum", wb.astype(np.int32).sum(axis=1, keepdims=True, dtype=np.int32)))
            y = op(n, "ReduceSum", [y, const(f"{n}/BlockAxis", np.array([1]))], "Sum", keepdims=0)  # [B,S,N]
        else:
            if x not in chains:
                chains[x] = quant_chain(x, f"/row8/{len(chains)}")
            q, s, zpi = chains[x]
            y = int_matmul(n, q, s, zpi, const(f"{wname}/int8", w8),
                           const(f"{wname}/colsum", w8.astype(np.int32).sum(axis=0, dtype=np.int32)))
        nodes.append(helper.make_node("Mul", [y, ws], [node.output[0]], name=f"{n}/ColScale"))
    kept = [i for i in g.initializer if i.name not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save(model, dst_path)


def _save(model: onnx.ModelProto, path: str) -> None:
    data = os.path.basename(path) + "_data"
    full = os.path.join(os.path.dirname(path), data)
    if os.path.exists(full):
        os.remove(full)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    # Stored shapes for every intermediate value. ONNX Runtime's memory planner matches a
    # value to a reusable buffer by shape; the shapes it cannot infer itself (Reshapes of
    # computed shapes, everywhere in row8's per-row arithmetic) made it scan long candidate
    # lists: SmolLM2 row8 took 11-16 s to start a session, 3 s with these (same kernels,
    # same numbers). The weights stay where they are; only the graph file is rewritten.
    graph = onnx.load(path, load_external_data=False)
    onnx.save(onnx.shape_inference.infer_shapes(graph, data_prop=True), path)


def one_token_logits(sess, cfg, ids):
    """Logits of ids fed one token per pass through the KV cache: what decoding computes
    (a per-tensor activation scale then covers one row, as in a decode step)."""
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
            for i in range(cfg["num_hidden_layers"]) for kv in ("key", "value")}
    rows = []
    for t, tok in enumerate(ids):
        res = sess.run(names, {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, t + 1), np.int64),
                               "position_ids": np.array([[t]], np.int64), **past})
        rows.append(res[0][0, -1].astype(np.float64))
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], res[1:])}
    return np.array(rows)


def full_logits(sess, cfg, ids):
    S = len(ids)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, S), np.int64),
             "position_ids": np.arange(S, dtype=np.int64)[None]}
    for i in range(cfg["num_hidden_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros(
                (1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
    return sess.run(["logits"], feeds)[0][0].astype(np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(model_dir: str, names: list[str], threads: int = 2, log=print, one_token: bool = False) -> dict:
    """Teacher-forced NLL per token, mean KL(fp32 || q) and top-1 agreement vs model_fp32.onnx;
    one_token: every graph fed one token per pass (the decode regime) instead of one pass."""
    import json

    import onnxruntime as ort
    from tokenizers import Tokenizer
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    seqs = [tok.encode(t, add_special_tokens=False).ids for t in QUALITY_TEXTS]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads

    def run(name):
        sess = ort.InferenceSession(os.path.join(model_dir, name), so, providers=["CPUExecutionProvider"])
        logits = one_token_logits if one_token else full_logits
        return [log_softmax(logits(sess, cfg, ids)) for ids in seqs]
    ref = run("model_fp32.onnx")
    out = {}
    for name in ["model_fp32.onnx"] + names:
        lp = ref if name == "model_fp32.onnx" else run(name)
        nll, kl, agree, n = 0.0, 0.0, 0, 0
        for ids, a, b in zip(seqs, ref, lp):
            tgt = np.array(ids[1:])
            nll += -b[np.arange(len(tgt)), tgt].sum()
            kl += (np.exp(a[:-1]) * (a[:-1] - b[:-1])).sum()
            agree += int((a[:-1].argmax(-1) == b[:-1].argmax(-1)).sum())
            n += len(tgt)
        out[name] = {"nll": nll / n, "ppl": float(np.exp(nll / n)), "kl": kl / n, "top1_agree": agree / n}
        log(f"  {name:28s} ppl={out[name]['ppl']:.3f} kl_vs_fp32={out[name]['kl']:.4f} "
            f"top1_agree={out[name]['top1_agree']:.3f} ({n} tokens)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--method", choices=["int8dyn", "nbits4", "nbits8", "hybrid4", "hybrid8", "row8"])
    ap.add_argument("--src", default="model_fp32.onnx")
    ap.add_argument("--dst")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--compare", nargs="*")
    ap.add_argument("--one-token", action="store_true", help="--compare feeding one token per pass (as decoding does)")
    args = ap.parse_args(argv)
    if args.method:
        quantize(args.model_dir, args.method, args.src, args.dst, args.block_size, args.accuracy_level)
    if args.compare is not None:
        compare(args.model_dir, args.compare, one_token=args.one_token)


if __name__ == "__main__":
    main()
