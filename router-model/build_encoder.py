#!/usr/bin/env python3
"""Builds `encoder.onnx`: the shipped MiniLM encoder with integer MatMuls, as the gateway runs it.

The shipped `model.onnx` (artifacts.toml) stores int8 weights but ONNX Runtime folds their
dequantisation at load, so it computes in fp32. This rebuilds it with integer matrix products:

1. The shipped `Cast` + `Mul` dequantisation of each MatMul weight is folded, then
   `quantize_dynamic` (MatMul only, per-channel int8 weights). It recovers exactly the shipped
   integers and scales; only the activations are newly quantised at run time.
2. Activations are quantised per token (one scale per row, symmetric, uint8 with zero point 128)
   instead of `DynamicQuantizeLinear`'s one scale per tensor, so a prompt's features do not depend
   on what it is batched or padded with. The per-row scale is applied after the weight scale: in
   the other order ONNX Runtime fuses the product into `MatMulIntegerToFloat`, which takes a scalar
   activation scale and would drop all rows but one.
3. Every weight is then a byte range of the shipped `model.onnx`: the graph refers to it as ONNX
   external data (file `model.onnx`, offset, length) instead of holding a copy. The result is
   ~100 KB and committed; the weights stay a pinned, provisioned download.

Deterministic: the same `model.onnx` gives a byte-identical `encoder.onnx` (checked by `--check`).

    python build_encoder.py            # writes encoder.onnx, prints its sha256
    python build_encoder.py --check    # rebuilds in memory and compares with the committed file
"""
import argparse
import hashlib
import logging
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402

OUT = os.path.join(HERE, "encoder.onnx")
WEIGHTS_FILE = "model.onnx"      # external data location, relative to the encoder directory
MIN_EXTERNAL = 1024              # smaller initializers stay inline


def fold_dequant(model, only_matmul_weights):
    """Replace `Cast(q int8 initializer -> float)` + `Mul(., scale initializer)` pairs by one
    float32 initializer float32(q) * scale named like the Mul's output. only_matmul_weights: fold
    only the pairs whose output is input 1 (the weight) of a MatMul. -> (model, number folded)."""
    from onnx import TensorProto, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    cast_of = {n.output[0]: n for n in g.node if n.op_type == "Cast" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8}
    matmul_w = {n.input[1] for n in g.node if n.op_type == "MatMul"}
    drop, new_inits = set(), []
    index = {n.output[0]: i for i, n in enumerate(g.node)}
    for i, n in enumerate(g.node):
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        a, b = n.input
        cast, scale = (cast_of.get(a), b) if a in cast_of else (cast_of.get(b), a)
        if cast is None or scale not in inits or (only_matmul_weights and n.output[0] not in matmul_w):
            continue
        q = numpy_helper.to_array(inits[cast.input[0]])
        s = numpy_helper.to_array(inits[scale])
        w = (q.astype(np.float32) * s.astype(np.float32)).astype(np.float32)
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w), n.output[0]))
        drop |= {i, index[cast.output[0]]}
    keep = [n for i, n in enumerate(g.node) if i not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    return model, len(new_inits)


def quantize(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.disable(logging.WARNING)   # "consider pre-processing" advice, irrelevant here
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, reduce_range=False)
    logging.disable(logging.NOTSET)


def per_row(model):
    """DynamicQuantizeLinear (per tensor) -> per-row symmetric uint8 quantisation."""
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    consts = {"rowq_zero_point": np.array(128, np.uint8), "rowq_127": np.array(127.0, np.float32),
              "rowq_eps": np.array(1e-12, np.float32), "rowq_128": np.array(128.0, np.float32),
              "rowq_lo": np.array(1.0, np.float32), "rowq_hi": np.array(255.0, np.float32)}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes, zero_points = [], set()
    for n in g.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        x, (q, s, zp), p = n.input[0], n.output, n.name
        nodes += [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs"),
            helper.make_node("ReduceMax", [p + "_abs"], [p + "_amax"], name=p + "_amax", axes=[-1], keepdims=1),
            helper.make_node("Max", [p + "_amax", "rowq_eps"], [p + "_amax_pos"], name=p + "_amax_pos"),
            helper.make_node("Div", [p + "_amax_pos", "rowq_127"], [s], name=p + "_scale"),
            helper.make_node("Div", [x, s], [p + "_scaled"], name=p + "_scaled"),
            helper.make_node("Round", [p + "_scaled"], [p + "_round"], name=p + "_round"),
            helper.make_node("Add", [p + "_round", "rowq_128"], [p + "_shift"], name=p + "_shift"),
            helper.make_node("Clip", [p + "_shift", "rowq_lo", "rowq_hi"], [p + "_clip"], name=p + "_clip"),
            helper.make_node("Cast", [p + "_clip"], [q], name=p + "_cast", to=TensorProto.UINT8),
        ]
        zero_points.add(zp)
    # quantize_dynamic scales each product by Mul(cast, Mul(a_scale, w_scale)); make it
    # Mul(Mul(cast, w_scale), a_scale) so the scalar-scale fusion cannot match.
    products = {n.output[0]: n for n in nodes if n.op_type == "Mul" and n.output[0].endswith("_quant_scales_mul:0")}
    out = []
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in zero_points:
                n.input[i] = "rowq_zero_point"
        if n.op_type == "Mul" and n.output[0] in products:
            continue
        if n.op_type == "Mul" and n.input[1] in products:
            a_scale, w_scale = products[n.input[1]].input
            out.append(helper.make_node("Mul", [n.input[0], w_scale], [n.output[0] + "_w"], name=n.name + "_w"))
            out.append(helper.make_node("Mul", [n.output[0] + "_w", a_scale], [n.output[0]], name=n.name + "_a"))
            continue
        out.append(n)
    if not zero_points or len(products) != sum(n.op_type == "MatMulInteger" for n in out):
        sys.exit("build_encoder: unexpected graph from quantize_dynamic (its output layout changed?)")
    del g.node[:]
    g.node.extend(out)
    return model


def externalise(model, weights):
    """Initializers that are byte ranges of `weights` become external data pointing there."""
    from onnx import TensorProto, numpy_helper
    moved = 0
    for t in model.graph.initializer:
        raw = t.raw_data or numpy_helper.to_array(t).tobytes()
        if len(raw) < MIN_EXTERNAL:
            continue
        at = weights.find(raw)
        if at < 0 or weights.find(raw, at + 1) >= 0:
            continue   # not in the shipped file, or ambiguous: kept inline
        for f in ("raw_data", "float_data", "int32_data", "int64_data"):
            t.ClearField(f)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(at)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        moved += 1
    return moved


def build():
    import onnx
    F.check_weights()   # offsets into another model.onnx would be meaningless
    weights = open(F.MODEL_PATH, "rb").read()
    with tempfile.TemporaryDirectory() as d:
        src, q = os.path.join(d, "src.onnx"), os.path.join(d, "q.onnx")
        # quantize_dynamic only sees float weights: undo the shipped Cast + Mul first (the
        # integers and scales it then recovers are the shipped ones, bit for bit).
        folded, n = fold_dequant(onnx.load(F.MODEL_PATH), only_matmul_weights=True)
        if n != 36:
            sys.exit(f"build_encoder: folded {n} MatMul weights, expected 36 (another model.onnx?)")
        onnx.save(folded, src)
        quantize(src, q)
        model = per_row(onnx.load(q))
    onnx.checker.check_model(model)
    moved = externalise(model, weights)
    return model.SerializeToString(), moved


def verify(graph_bytes):
    """The split graph loads against the encoder directory and agrees with the float encoder."""
    tok = F.load_tokenizer()
    texts = ["hi", "Prove that there are infinitely many primes.", "Translate to German: the train is late."]
    ids = [F.encode(tok, t) for t in texts]
    ref = F.Encoder(F.MODEL_PATH, threads=1)
    new = F.Encoder(graph_bytes, threads=1, weights_dir=F.MODEL_DIR)
    for x in ids:
        a = F.pool(*ref.run([x]))[0][0]
        b = F.pool(*new.run([x]))[0][0]
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        if cos < 0.99:
            sys.exit(f"build_encoder: embedding cosine {cos:.4f} to the float encoder (< 0.99)")
    batched = F.pool(*new.run(ids))[0]
    single = np.vstack([F.pool(*new.run([x]))[0] for x in ids])
    if np.abs(batched - single).max() > 1e-5:
        sys.exit("build_encoder: batched features differ from single ones")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare a rebuild with the committed file")
    a = ap.parse_args()
    graph, moved = build()
    digest = hashlib.sha256(graph).hexdigest()
    if a.check:
        have = open(OUT, "rb").read()
        if have != graph:
            sys.exit(f"{OUT} differs from a rebuild (sha256 {hashlib.sha256(have).hexdigest()} vs {digest})")
        print(f"ok  encoder.onnx is a byte-identical rebuild (sha256 {digest})")
        return
    verify(graph)
    with open(OUT + ".tmp", "wb") as f:
        f.write(graph)
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {OUT}: {len(graph)} bytes, {moved} weights read from {WEIGHTS_FILE}, sha256 {digest}")


if __name__ == "__main__":
    main()
