#!/usr/bin/env python3
"""Quantize an fp32 Optimum-layout decoder graph for CPU, and compare variants.

  quantize.py MODEL_DIR --method nbits4 [--block-size 32] [--accuracy-level 4]
  quantize.py MODEL_DIR --method int8dyn
  quantize.py MODEL_DIR --compare model_a.onnx model_b.onnx ...   # quality vs model_fp32.onnx

Methods:
  int8dyn  onnxruntime.quantization.quantize_dynamic, MatMul only, per-channel int8 weights,
           activations quantized at run time (MatMulInteger / DynamicQuantizeMatMul).
  nbits4   MatMulNBitsQuantizer, 4-bit blockwise asymmetric weights (com.microsoft.MatMulNBits).
  nbits8   MatMulNBitsQuantizer, 8-bit blockwise asymmetric weights.

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


def _save(model: onnx.ModelProto, path: str) -> None:
    data = os.path.basename(path) + "_data"
    full = os.path.join(os.path.dirname(path), data)
    if os.path.exists(full):
        os.remove(full)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


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


def compare(model_dir: str, names: list[str], threads: int = 2, log=print) -> dict:
    """Teacher-forced NLL per token, mean KL(fp32 || q) and top-1 agreement vs model_fp32.onnx."""
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
        return [log_softmax(full_logits(sess, cfg, ids)) for ids in seqs]
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
    ap.add_argument("--method", choices=["int8dyn", "nbits4", "nbits8", "hybrid4", "hybrid8"])
    ap.add_argument("--src", default="model_fp32.onnx")
    ap.add_argument("--dst")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--compare", nargs="*")
    args = ap.parse_args(argv)
    if args.method:
        quantize(args.model_dir, args.method, args.src, args.dst, args.block_size, args.accuracy_level)
    if args.compare is not None:
        compare(args.model_dir, args.compare)


if __name__ == "__main__":
    main()
