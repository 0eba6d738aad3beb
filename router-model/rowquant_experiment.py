#!/usr/bin/env python3
"""Research experiment: make the integer-MatMul encoder (`dyn-pc-s8` of requant_experiment.py)
batch-independent by quantising activations PER ROW (per token) instead of per tensor, and check
batch independence, fidelity, speed, router accuracy and (emulated) int16 saturation on x86 CPUs
without VNNI. Nothing here changes the shipped router.

    ~/.cache/tiergate/venv-router/bin/python rowquant_experiment.py            # everything
    ~/.cache/tiergate/venv-router/bin/python rowquant_experiment.py --build    # only build + check the graphs
    ~/.cache/tiergate/venv-router/bin/python rowquant_experiment.py --time     # only the speed tables
Tables are printed as markdown and written raw to ~/.cache/tiergate/rowquant/run_output.md;
results/rowquant.md is those tables pasted unchanged plus the prose.

Variants (fixed before any result):
  * dyn-pc-s8          requant_experiment.build("dyn-pc-s8") unchanged: DynamicQuantizeLinear (ONE
                       uint8 scale / zero point over the whole [B, T, K] tensor, padding included)
                       -> MatMulInteger(u8, s8 per-column weights = the shipped int8 integers).
  * dyn-pc-s8-row      (a) symmetric per row: every DynamicQuantizeLinear(x) is replaced by plain ops
                       s = max(max_k |x[..., k]|, tiny) / 127   (shape [B, T, 1]; computed with Div)
                       q = Cast<uint8>(Clip(Round(x / s) + 128, 0, 255))
                       then MatMulInteger(q, W, a_zero_point = 128 (scalar uint8 constant), W_zp)
                       -> Cast -> Mul(s) -> Mul(W_scale). Each token row has its own scale, so a
                       prompt's result no longer depends on its batch mates or on padding.
  * dyn-pc-s8-row-asym (b) asymmetric per row (as DynamicQuantizeLinear, but per row):
                       lo = min(min_k x, 0), hi = max(max_k x, 0), s = max((hi - lo) / 255, tiny),
                       zp = Round(-lo / s), q = Cast<uint8>(Clip(Round(x / s) + zp, 0, 255)),
                       MatMulInteger(q, W, a_zero_point = 0) - zp * colsum(W) in int32
                       (colsum = ReduceSum(Cast<int32>(W), axis 0): constant, folded by ONNX
                       Runtime at load) -> Cast -> Mul(s) -> Mul(W_scale).
  In both, every initializer of dyn-pc-s8 is kept byte for byte (checked); only small scalar
  constants are added. The rewrite avoids ONNX Runtime's MatMulIntegerToFloat fusion pattern
  (Mul(Cast(MatMulInteger), Mul(a_scale, b_scale))), whose kernel takes a per-tensor a_scale.

Measurements: see main() and results/rowquant.md. Reuses requant_experiment.py (building
dyn-pc-s8, the batch-1 featurizer, static_experiment.Bench for the grouped CV + paired bootstrap).
"""
import argparse
import collections
import hashlib
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402
import requant_experiment as RQ  # noqa: E402

ROOT = os.path.join(F.CACHE, "rowquant")
REF = "shipped (int8 weights, fp32 math)"
DYN = "dyn-pc-s8"
ROWS = {"dyn-pc-s8-row": "sym", "dyn-pc-s8-row-asym": "asym"}
TINY = np.float32(1e-30)


# ---------------------------------------------------------------- building
def build_row(src, dst, mode):
    """dyn-pc-s8 graph at src -> per-row variant at dst. mode: 'sym' | 'asym'.
    -> dict(n_dql, n_mmi)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    m = onnx.load(src)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)

    consts = {
        "rowq_c127": np.array(127, np.float32), "rowq_c255": np.array(255, np.float32),
        "rowq_c128": np.array(128, np.float32), "rowq_c0": np.array(0, np.float32),
        "rowq_tiny": np.array(TINY, np.float32), "rowq_zp128": np.array(128, np.uint8), "rowq_zp0": np.array(0, np.uint8),
        "rowq_axis0": np.array([0], np.int64),
    }
    new_inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]

    dql = [n for n in g.node if n.op_type == "DynamicQuantizeLinear"]
    plan_dql, skip, plan_mmi, plan_out = {}, set(), {}, {}
    for d in dql:
        x = d.input[0]
        q, s, zp = d.output
        N = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=f"{outs[0]}_node", **kw)  # noqa: E731
        if mode == "sym":
            nodes = [N("Abs", [x], [f"{x}_rowabs"]),
                     N("ReduceMax", [f"{x}_rowabs"], [f"{x}_rowamax"], axes=[-1], keepdims=1),
                     N("Div", [f"{x}_rowamax", "rowq_c127"], [f"{x}_rowscale0"]),
                     N("Max", [f"{x}_rowscale0", "rowq_tiny"], [f"{x}_rowscale"]),
                     N("Div", [x, f"{x}_rowscale"], [f"{x}_rowdiv"]),
                     N("Round", [f"{x}_rowdiv"], [f"{x}_rowround"]),
                     N("Add", [f"{x}_rowround", "rowq_c128"], [f"{x}_rowshift"]),
                     N("Clip", [f"{x}_rowshift", "rowq_c0", "rowq_c255"], [f"{x}_rowclip"]),
                     N("Cast", [f"{x}_rowclip"], [f"{x}_rowq"], to=TensorProto.UINT8)]
        else:
            nodes = [N("ReduceMin", [x], [f"{x}_rowmin0"], axes=[-1], keepdims=1),
                     N("ReduceMax", [x], [f"{x}_rowmax0"], axes=[-1], keepdims=1),
                     N("Min", [f"{x}_rowmin0", "rowq_c0"], [f"{x}_rowmin"]),
                     N("Max", [f"{x}_rowmax0", "rowq_c0"], [f"{x}_rowmax"]),
                     N("Sub", [f"{x}_rowmax", f"{x}_rowmin"], [f"{x}_rowrange"]),
                     N("Div", [f"{x}_rowrange", "rowq_c255"], [f"{x}_rowscale0"]),
                     N("Max", [f"{x}_rowscale0", "rowq_tiny"], [f"{x}_rowscale"]),
                     N("Div", [f"{x}_rowmin", f"{x}_rowscale"], [f"{x}_rowzpneg"]),
                     N("Neg", [f"{x}_rowzpneg"], [f"{x}_rowzp0"]),
                     N("Round", [f"{x}_rowzp0"], [f"{x}_rowzp1"]),
                     N("Clip", [f"{x}_rowzp1", "rowq_c0", "rowq_c255"], [f"{x}_rowzpf"]),
                     N("Cast", [f"{x}_rowzpf"], [f"{x}_rowzp"], to=TensorProto.INT32),
                     N("Div", [x, f"{x}_rowscale"], [f"{x}_rowdiv"]),
                     N("Round", [f"{x}_rowdiv"], [f"{x}_rowround"]),
                     N("Add", [f"{x}_rowround", f"{x}_rowzpf"], [f"{x}_rowshift"]),
                     N("Clip", [f"{x}_rowshift", "rowq_c0", "rowq_c255"], [f"{x}_rowclip"]),
                     N("Cast", [f"{x}_rowclip"], [f"{x}_rowq"], to=TensorProto.UINT8)]
        plan_dql[d.name] = nodes
        for c in cons[q]:
            assert c.op_type == "MatMulInteger" and c.input[0] == q and c.input[2] == zp, c
            W, Wzp = c.input[1], c.input[3]
            assert not numpy_helper.to_array(inits[Wzp]).any()          # symmetric weights (zp 0)
            cast = cons[c.output[0]]
            assert len(cast) == 1 and cast[0].op_type == "Cast"
            outmul = cons[cast[0].output[0]]
            assert len(outmul) == 1 and outmul[0].op_type == "Mul"
            smul = prod[outmul[0].input[1]]
            assert smul.op_type == "Mul" and smul.input[0] == s and len(cons[smul.output[0]]) == 1
            Wscale = smul.input[1]
            skip.add(smul.name)
            r = c.output[0]
            if mode == "sym":
                mm = [helper.make_node("MatMulInteger", [f"{x}_rowq", W, "rowq_zp128", Wzp], [r], name=c.name)]
            else:
                mm = [helper.make_node("MatMulInteger", [f"{x}_rowq", W, "rowq_zp0", Wzp], [f"{r}_raw"], name=c.name),
                      N("Cast", [W], [f"{W}_i32"], to=TensorProto.INT32),
                      N("ReduceSum", [f"{W}_i32", "rowq_axis0"], [f"{W}_colsum"], keepdims=0),
                      N("Mul", [f"{x}_rowzp", f"{W}_colsum"], [f"{r}_zpcorr"]),
                      N("Sub", [f"{r}_raw", f"{r}_zpcorr"], [r])]
            plan_mmi[c.name] = mm
            y = outmul[0].output[0]
            plan_out[outmul[0].name] = [N("Mul", [cast[0].output[0], f"{x}_rowscale"], [f"{y}_rowscaled"]),
                                        N("Mul", [f"{y}_rowscaled", Wscale], [y])]
    nodes = []
    for n in g.node:
        if n.name in plan_dql:
            nodes += plan_dql[n.name]
        elif n.name in skip:
            continue
        elif n.name in plan_mmi:
            nodes += plan_mmi[n.name]
        elif n.name in plan_out:
            nodes += plan_out[n.name]
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input}
    g.initializer.extend(i for i in new_inits if i.name in used)
    assert all(i.name in used for i in g.initializer), [i.name for i in g.initializer if i.name not in used]
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    return dict(n_dql=len(dql), n_mmi=len(plan_mmi))


def build_all(out_dir):
    """-> {key: path}; dyn-pc-s8 via requant_experiment.build, then the row variants from it."""
    import logging
    logging.disable(logging.WARNING)
    os.makedirs(out_dir, exist_ok=True)
    src, _ = RQ.build("dyn-pc-s8", out_dir)
    paths, info = {"dyn-pc-s8": src}, {}
    for key, mode in ROWS.items():
        t0 = time.time()
        dst = os.path.join(out_dir, f"{key}.onnx")
        info[key] = build_row(src, dst, mode)
        info[key]["seconds"] = time.time() - t0
        paths[key] = dst
    return paths, info


def init_check(path, ref_path):
    """(number of ref initializers, number present in path with byte-identical TensorProto, names added)."""
    import onnx
    a = {i.name: i.SerializeToString() for i in onnx.load(path).graph.initializer}
    b = {i.name: i.SerializeToString() for i in onnx.load(ref_path).graph.initializer}
    same = sum(1 for k, v in b.items() if a.get(k) == v)
    return len(b), same, sorted(set(a) - set(b))


def check_graph(path):
    """onnx.checker + default ONNX Runtime session (graph optimisation level ALL, the default)."""
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(path), full_check=True)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return True


def runtime_ops(path, tag):
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(ROOT, f"runtime-{tag}.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- helpers
def cosdist(a, b):
    return 1.0 - np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def l2(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def pooled_batches(enc, ids, size):
    """Arrival-order batches of `size`, padded to the longest, -> pooled mean [N, 384]."""
    out = np.zeros((len(ids), F.HIDDEN), np.float32)
    for s0 in range(0, len(ids), size):
        h, msk = enc.run(ids[s0:s0 + size])
        out[s0:s0 + size] = F.pool(h, msk)[0]
    return out


def embed_batch1(path, key, texts, name, tok):
    """requant_experiment.embed_batch1 with the cache under ROOT (dyn-pc-s8 reuses requant's cache)."""
    old = RQ.ROOT
    RQ.ROOT = RQ.ROOT if key == "dyn-pc-s8" else ROOT
    try:
        return RQ.embed_batch1(path, key, texts, name, tok)
    finally:
        RQ.ROOT = old


def shipped_features(bench, tok):
    """Reference features of the shipped model.onnx (fp32 math) for every benchmark text.
    While features.py embeds with model.onnx, these are train.feature_matrix's cached features
    (length-sorted batches of 32; bit-equal to batch 1 for this graph, requant.md). Once
    features.py serves another graph by default (features.served_graph(), e.g. an integer
    encoder.onnx on VNNI CPUs), train.feature_matrix no longer embeds with model.onnx, so the
    reference is then embedded here explicitly from model.onnx at batch 1 (cached under ROOT)."""
    import train as T
    served = getattr(F, "served_graph", None)
    if served is None or served() == F.MODEL_PATH:
        return ({b: T.feature_matrix(t, "extra" if b == "own" else b) for b, t in bench.texts.items()},
                "train.feature_matrix cache of model.onnx, batches of 32, bit-equal to batch 1 per requant.md")
    return ({b: embed_batch1(F.MODEL_PATH, "shipped", t, b, tok) for b, t in bench.texts.items()},
            "model.onnx at batch 1")


# ---------------------------------------------------------------- saturation (emulated)
def mmi_specs(path):
    """Per MatMulInteger: dict(name, a (u8 input), w (int8 init), wscale, ascale (tensor), azp (tensor
    or const), y (float output of the final Mul), r (int32 result tensor fed to Cast))."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    specs = []
    for n in g.node:
        if n.op_type != "MatMulInteger":
            continue
        a, w = n.input[0], n.input[1]
        # follow to the Cast (possibly through the asym Sub)
        r = n.output[0]
        nxt = cons[r]
        if nxt[0].op_type == "Sub":
            r = nxt[0].output[0]
            nxt = cons[r]
        cast = nxt[0]
        mul1 = cons[cast.output[0]][0]
        if mul1.input[1] in prod and prod[mul1.input[1]].op_type == "Mul":     # dyn-pc-s8: Mul(cast, s*ws)
            smul = prod[mul1.input[1]]
            ascale, wscale, y = smul.input[0], smul.input[1], mul1.output[0]
            azp = n.input[2]
        else:                                                                  # row: Mul(Mul(cast, s), ws)
            mul2 = cons[mul1.output[0]][0]
            ascale, wscale, y = mul1.input[1], mul2.input[1], mul2.output[0]
            azp = n.input[2] if n.input[2] == "rowq_zp128" else a.replace("_rowq", "_rowzp")
        specs.append(dict(name=n.name, a=a, w=inits[w].astype(np.int8), wscale=inits[wscale].astype(np.float32),
                          ascale=ascale, azp=azp, azp_const=inits.get(azp), y=y, r=r, mmi_out=n.output[0]))
    return specs


def capture(path, specs, ids_list):
    """Run each prompt at batch 1 with the needed tensors as extra graph outputs.
    -> list over prompts of {tensor name: array}."""
    import onnx
    import onnxruntime as ort
    m = onnx.load(path)
    have = {o.name for o in m.graph.output}
    want, types = [], {}
    U8, I32, F32 = onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
    for s in specs:
        azp = [(s["azp"], I32 if s["azp"].endswith("_rowzp") else U8)] if s["azp_const"] is None else []
        for t, ty in [(s["a"], U8), (s["ascale"], F32), (s["y"], F32), (s["mmi_out"], I32)] + azp:
            if t not in have and t not in want:
                want.append(t)
                types[t] = ty
    for t in want:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, types[t], None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = []
    for ids in ids_list:
        x = np.array([ids], np.int64)
        vals = sess.run(want, {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)})
        out.append(dict(zip(want, vals)))
    return out


def saturation(specs, caps):
    """Emulate MLAS's AVX2 (non-VNNI) u8s8 kernel: vpmaddubsw forms a[2i]*b[2i] + a[2i+1]*b[2i+1]
    (pairs adjacent along K, raw uint8 A incl. its zero point, int8 B) saturated to int16, then
    vpmaddwd/vpaddd accumulate in int32 exactly; the A zero point is corrected separately (exactly).
    Only (pair, column) candidates with 255 * (|b0| + |b1|) > 32767 can saturate, so only those are
    evaluated (exact). -> per MatMul dict, plus a check that numpy's exact int32 result equals ORT's."""
    res = []
    for s in specs:
        W = s["w"].astype(np.int32)
        K, N = W.shape
        be, bo = W[0::2], W[1::2]                                  # [K/2, N]
        cand = np.argwhere(255 * (np.abs(be) + np.abs(bo)) > 32767)  # (pair i, column n)
        ci, cn = cand[:, 0], cand[:, 1]
        import scipy.sparse as sp
        onehot_t = sp.csr_matrix((np.ones(len(cand)), (cn, np.arange(len(cand)))), shape=(N, len(cand)))  # [N, C]
        colsum = W.sum(0).astype(np.float64)[None, :]
        Wf = W.astype(np.float64)
        n_sat = n_out = n_out_aff = rows = 0
        max_rel_of_max, max_rel_elem, check_max = 0.0, 0.0, 0
        for c in caps:
            A = c[s["a"]].reshape(-1, K).astype(np.int32)          # [M, K] uint8 values
            M = A.shape[0]
            rows += M
            azp = s["azp_const"] if s["azp_const"] is not None else c[s["azp"]]
            azp = np.asarray(azp, np.float64).reshape(-1, 1) if np.ndim(azp) else np.float64(azp)
            # float64 BLAS: every partial sum is an integer below 2^53, so this is the exact int result
            exact = A.astype(np.float64) @ Wf - azp * colsum
            ort_r = c[s["mmi_out"]].reshape(M, N).astype(np.float64)
            if s["azp"].endswith("_rowzp"):                        # asym: ORT's MatMulInteger output is before the Sub
                ort_r = ort_r - azp * colsum
            check_max = max(check_max, int(np.abs(ort_r - exact).max()))
            S = A[:, 2 * ci] * be[ci, cn][None, :] + A[:, 2 * ci + 1] * bo[ci, cn][None, :]   # [M, C]
            D = np.clip(S, -32768, 32767) - S
            n_sat += int((D != 0).sum())
            aff = (onehot_t @ (D != 0).astype(np.float64).T).T > 0  # [M, N]
            n_out += M * N
            n_out_aff += int(aff.sum())
            if aff.any():
                dint = (onehot_t @ D.astype(np.float64).T).T         # [M, N] change of the int32 result
                asc = np.asarray(c[s["ascale"]], np.float64).reshape(-1, 1) if np.size(c[s["ascale"]]) > 1 \
                    else np.float64(c[s["ascale"]])
                yex = exact * asc * s["wscale"][None, :]
                dy = dint * asc * s["wscale"][None, :]
                max_rel_of_max = max(max_rel_of_max, float(np.abs(dy).max() / np.abs(yex).max()))
                big = np.abs(yex) >= 0.01 * np.abs(yex).max()
                if (aff & big).any():
                    max_rel_elem = max(max_rel_elem, float((np.abs(dy) / np.maximum(np.abs(yex), 1e-30))[aff & big].max()))
        res.append(dict(name=s["name"], K=K, N=N, cand=len(cand), pairs=rows * (K // 2) * N, n_sat=n_sat,
                        out=n_out, out_aff=n_out_aff, rel_max=max_rel_of_max, rel_elem=max_rel_elem,
                        check=check_max))
    return res


def yscale_check(specs, caps):
    """max relative |ORT float output - numpy (exact int32) * a_scale * w_scale| over the captured MatMuls:
    shows that ONNX Runtime computes the rewritten graph as intended (no wrong fusion)."""
    worst = 0.0
    for s in specs:
        W = s["w"].astype(np.int64)
        K, N = W.shape
        for c in caps:
            A = c[s["a"]].reshape(-1, K).astype(np.int64)
            azp = s["azp_const"] if s["azp_const"] is not None else c[s["azp"]]
            azp = np.asarray(azp).astype(np.int64).reshape(-1, 1) if np.ndim(azp) else np.int64(azp)
            ex = A @ W - azp * W.sum(0)[None, :]
            asc = np.asarray(c[s["ascale"]], np.float64)
            asc = asc.reshape(-1, 1) if asc.size > 1 else asc.reshape(())
            y = ex * asc * s["wscale"][None, :]
            got = c[s["y"]].reshape(y.shape)
            worst = max(worst, float(np.abs(got - y).max() / np.abs(y).max()))
    return worst


def layer_kind(i):
    return f"L{i // 6} " + ["Q", "K", "V", "attn-out", "FFN-in", "FFN-out"][i % 6]


# ---------------------------------------------------------------- timing
def timing_cpu(paths, texts, tok, batch, warm=3):
    """1-thread process CPU time per call (tokenize + encoder + pool + L2 + length) for every graph,
    interleaved call by call (order rotated per call). batch 1: one prompt per call; batch 8:
    arrival-order groups of 8 padded to the longest. -> {key: median ms}."""
    keys = list(paths)
    encs = {k: F.Encoder(p, threads=1) for k, p in paths.items()}
    groups = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]

    def call(k, grp):
        ids = [F.encode(tok, t) for t in grp]
        h, msk = encs[k].run(ids)
        e = F.pool(h, msk)[0]
        return np.hstack([l2(e), F.hand_matrix(grp)])

    for k in keys:
        for g in groups[:warm]:
            call(k, g)
    ts = {k: [] for k in keys}
    for i, g in enumerate(groups):
        for j in range(len(keys)):
            k = keys[(i + j) % len(keys)]
            c0 = time.process_time()
            call(k, g)
            ts[k].append(time.process_time() - c0)
    return {k: float(np.median(v)) * 1e3 for k, v in ts.items()}


def timing_wall(paths, texts, tok, warm=20):
    """2-thread wall clock at batch 1, graphs interleaved call by call -> {key: (p50, p99) ms}."""
    keys = list(paths)
    fz = {k: RQ.Featurizer(p, threads=2) for k, p in paths.items()}
    for k in keys:
        for t in texts[:warm]:
            fz[k].features(tok, t)
    ts = {k: [] for k in keys}
    for i, t in enumerate(texts):
        for j in range(len(keys)):
            k = keys[(i + j) % len(keys)]
            c0 = time.perf_counter()
            fz[k].features(tok, t)
            ts[k].append(time.perf_counter() - c0)
    return {k: (float(np.percentile(v, 50)) * 1e3, float(np.percentile(v, 99)) * 1e3) for k, v in ts.items()}


def speed_tables(allpaths, ttexts, tok, repeats=3):
    lines, raw = [], []
    keys = list(allpaths)
    for batch, ntexts in ((1, 300), (8, 320)):
        for r in range(repeats):
            t = timing_cpu(allpaths, ttexts[:ntexts], tok, batch)
            raw.append((batch, r, t, os.getloadavg()[0]))
            print(f"cpu batch {batch} repeat {r + 1}:", {k: round(v, 2) for k, v in t.items()}, flush=True)
    lines += ["| graph | batch | 1-thread CPU ms per call, median (repeat 1 / 2 / 3) | ratio vs shipped (1 / 2 / 3) | ratio vs dyn-pc-s8 (1 / 2 / 3) |",
              "|---|---|---|---|---|"]
    for batch in (1, 8):
        rr = [t for b, _, t, _ in raw if b == batch]
        for k in keys:
            lines.append(f"| {k} | {batch} | {' / '.join(f'{t[k]:.2f}' for t in rr)} | "
                         f"{' / '.join(f'{t[k] / t[REF]:.2f}' for t in rr)} | "
                         f"{' / '.join(f'{t[k] / t[DYN]:.2f}' for t in rr)} |")
    lines += ["", f"1-thread CPU: calls interleaved graph by graph (order rotated per call); batch 1 = 300 MMLU "
              f"prompts, batch 8 = 40 arrival-order groups of 8 (320 prompts) padded to the longest; 32-token "
              f"recipe; 1-min load after each repeat: {', '.join(f'{l:.2f}' for *_, l in raw)}.", ""]
    wkeys = [REF, "dyn-pc-s8-row"]
    w = timing_wall({k: allpaths[k] for k in wkeys}, ttexts[:300], tok)
    lines += ["| graph | 2-thread wall p50 ms | p50 ratio vs shipped | 2-thread wall p99 ms | p99 ratio vs shipped |",
              "|---|---|---|---|---|"]
    for k in wkeys:
        lines.append(f"| {k} | {w[k][0]:.2f} | {w[k][0] / w[REF][0]:.2f} | {w[k][1]:.2f} | {w[k][1] / w[REF][1]:.2f} |")
    lines += ["", f"2-thread wall: batch 1, 32 tokens, 300 MMLU prompts each after 20 warm-ups, the two graphs "
              f"interleaved call by call; 1-min load at the end {os.getloadavg()[0]:.2f}."]
    return lines


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="only build and check the graphs")
    ap.add_argument("--time", action="store_true", help="only the speed tables")
    ap.add_argument("--sat-prompts", type=int, default=100)
    a = ap.parse_args()
    import onnxruntime as ort
    t_start = time.time()
    load_start = os.getloadavg()
    os.makedirs(ROOT, exist_ok=True)
    out_dir = os.path.join(ROOT, "build")
    paths, info = build_all(out_dir)
    allpaths = {REF: F.MODEL_PATH, **paths}
    tok = F.load_tokenizer()

    # ---- graphs: checks, initializers, what ONNX Runtime runs, determinism
    b2, _ = build_all(os.path.join(ROOT, "build2"))
    g_lines = ["| graph | file MB | sha256 | rebuilt identical | onnx.checker + ORT load | dyn-pc-s8 initializers byte-identical | initializers added | ops ONNX Runtime runs (level ALL) |",
               "|---|---|---|---|---|---|---|---|"]
    for k, p in allpaths.items():
        n_ref, n_same, added = init_check(p, paths["dyn-pc-s8"]) if k != REF else ("-", "-", [])
        same_build = "-" if k == REF else ("yes" if F._file_sha(p) == F._file_sha(b2[k]) else "NO")
        ops = runtime_ops(p, k.split(" ")[0])
        g_lines.append(f"| {k} | {os.path.getsize(p) / 1e6:.1f} | `{F._file_sha(p)[:16]}…` | {same_build} | "
                       f"{'ok' if check_graph(p) else 'FAIL'} | {n_same} of {n_ref} | {len(added) if k != REF else '-'} | {ops} |")
    sq = {k: RQ.same_integers(p) if k == "dyn-pc-s8" else None for k, p in paths.items()}
    ship_w = "dyn-pc-s8: %d of %d MatMul weights are exactly the shipped int8 values (zero point 0, bit-identical scales)." % sq["dyn-pc-s8"]
    for ln in g_lines + ["", ship_w]:
        print(ln, flush=True)
    if a.build:
        print({k: v for k, v in info.items()})
        return

    import static_experiment as S
    import train as T
    bench = S.Bench()
    order = np.random.default_rng(0).permutation(len(bench.texts["mmlu"]))
    ttexts = [bench.texts["mmlu"][i] for i in order[:320]]     # first 300 = encoders_experiment.timing_texts
    if a.time:
        for ln in speed_tables(allpaths, ttexts, tok):
            print(ln, flush=True)
        return

    # ---- accuracy features first (the slow part), at batch 1
    feats = {}
    for k, p in paths.items():
        t0 = time.time()
        feats[k] = {b: embed_batch1(p, k, t, b, tok) for b, t in bench.texts.items()}
        print(f"features {k}: {time.time() - t0:.0f} s", flush=True)
    ship, ship_how = shipped_features(bench, tok)
    print("shipped reference features:", ship_how, flush=True)
    fset = {REF: ship, **feats}

    # ---- batch independence + fidelity on 200 MMLU prompts
    btexts = ttexts[:200]
    ids = [F.encode(tok, t) for t in btexts]
    hand = F.hand_matrix(btexts)
    head = ort.InferenceSession(os.path.join(HERE, "head.onnx"), providers=["CPUExecutionProvider"])

    def refit_head(X):
        """train.py's final head (fit_head + Platt) on this graph's batch-1 features, all rows."""
        Xa = np.vstack([X["mmlu"], X["own"]])
        tm, em = bench.tm, (1.0 - bench.weak) * bench.strong
        tgt = np.r_[tm, bench.to]
        wt = np.r_[np.ones(len(tm)), bench.wo]
        ev = np.r_[em, (bench.to >= 0.5).astype(float)]
        w, b = T.fit_head(Xa, tgt, wt)
        ac, bc = T.fit_platt(Xa @ w + b, ev, wt)
        return lambda Z: 1.0 / (1.0 + np.exp(-(ac * (Z @ w + b) + bc)))

    bi, fid = {}, {}
    pooled1 = {}
    for k, p in allpaths.items():
        enc = F.Encoder(p, threads=2)
        p1 = pooled_batches(enc, ids, 1)
        pooled1[k] = p1
        Z1 = np.hstack([l2(p1), hand]).astype(np.float32)
        hk = refit_head(fset[k])
        row = {}
        for tag, size in (("b8", 8), ("b32", 32)):
            if tag == "b32":           # length-sorted batches of 32 (as train.py / the Rust evaluator)
                srt = np.argsort([len(x) for x in ids], kind="stable")
                pb = np.zeros_like(p1)
                for s0 in range(0, len(ids), 32):
                    idx = srt[s0:s0 + 32]
                    h, msk = enc.run([ids[i] for i in idx])
                    pb[idx] = F.pool(h, msk)[0]
            else:
                pb = pooled_batches(enc, ids, size)
            Zb = np.hstack([l2(pb), hand]).astype(np.float32)
            cd = np.abs(cosdist(pb, p1))
            fd = np.abs(Zb - Z1).max(1)
            ds = np.abs(head.run(None, {"features": Zb})[0][:, 0] - head.run(None, {"features": Z1})[0][:, 0])
            dr = np.abs(hk(Zb.astype(np.float64)) - hk(Z1.astype(np.float64)))
            row[tag] = dict(cd_med=float(np.median(cd)), cd_max=float(cd.max()), fd_med=float(np.median(fd)),
                            fd_max=float(fd.max()), ds_med=float(np.median(ds)), ds_max=float(ds.max()),
                            dr_med=float(np.median(dr)), dr_max=float(dr.max()))
        bi[k] = row
        print("batch independence", k, row, flush=True)
        if k != REF:
            c = 1.0 - cosdist(p1, pooled1[REF])
            fid[k] = dict(mean=float(c.mean()), min=float(c.min()), maxabs=float(np.abs(p1 - pooled1[REF]).max()))
            print("fidelity", k, fid[k], flush=True)
        del enc
    bi_lines = ["| graph | batches | median / max of 1 - cos (pooled) | median / max of max abs diff of the 385 features | score by shipped head.onnx: median / max abs diff | score by refit head: median / max abs diff |",
                "|---|---|---|---|---|---|"]
    for k, row in bi.items():
        for tag, lab in (("b8", "8, arrival order"), ("b32", "32, length-sorted")):
            r = row[tag]
            bi_lines.append(f"| {k} | {lab} | {r['cd_med']:.2e} / {r['cd_max']:.2e} | {r['fd_med']:.2e} / {r['fd_max']:.2e} | "
                            f"{r['ds_med']:.2e} / {r['ds_max']:.2e} | {r['dr_med']:.2e} / {r['dr_max']:.2e} |")
    fid_lines = ["| graph | cosine to shipped (pooled, batch 1, 200 MMLU): mean / min | max abs diff of pooled embedding |",
                 "|---|---|---|"]
    for k, v in fid.items():
        fid_lines.append(f"| {k} | {v['mean']:.6f} / {v['min']:.6f} | {v['maxabs']:.3g} |")
    for ln in bi_lines + [""] + fid_lines:
        print(ln, flush=True)

    # ---- accuracy: grouped CV + hand-written CV AUC + paired bootstrap
    acc = [f"| encoder graph (shipped recipe otherwise; features at batch 1; shipped: {ship_how}) | MMLU grouped CV APGR | hand-written CV AUC | GSM8K APGR | MT-Bench APGR |",
           "|---|---|---|---|---|"]
    acc.append(bench.run(REF, lambda mt, ot: ship)[1])
    for k in paths:
        acc.append(bench.run(k, lambda mt, ot, X=feats[k]: X)[1])
    boot = []
    for k in list(ROWS) + ["dyn-pc-s8"]:
        boot += ["", f"Paired bootstrap ({k} vs shipped; items resampled, 2000 resamples, seed 0; MMLU: out-of-fold "
                 "scores; GSM8K / MT-Bench: final heads, printed beside, not used to decide):", "",
                 "| benchmark | variant APGR [95% CI] | shipped APGR [95% CI] | variant - shipped [95% CI] | P(variant <= shipped) |",
                 "|---|---|---|---|---|"] + bench.bootstrap(k, REF)
    for ln in acc + boot:
        print(ln, flush=True)

    # ---- saturation emulation (non-VNNI AVX2 u8s8), batch 1
    sat_texts = ttexts[:a.sat_prompts]
    sat_ids = [F.encode(tok, t) for t in sat_texts]
    sat, ycheck = {}, {}
    for k in paths:
        t0 = time.time()
        specs = mmi_specs(paths[k])
        caps = capture(paths[k], specs, sat_ids)
        sat[k] = saturation(specs, caps)
        ycheck[k] = yscale_check(specs, caps[:20])
        print(f"saturation {k}: {time.time() - t0:.0f} s; total saturated pairs {sum(r['n_sat'] for r in sat[k])}, "
              f"exact int32 check max diff {max(r['check'] for r in sat[k])}, float output check {ycheck[k]:.2e}", flush=True)
        del caps
    keys = list(paths)
    sat_lines = ["| MatMul (K x N) | candidate (pair, column) with 255(abs b0 + abs b1) > 32767 | "
                 + " | ".join(f"{k}: saturated pairs / outputs affected" for k in keys) + " |",
                 "|---|---|" + "---|" * len(keys)]
    for i in range(len(sat[keys[0]])):
        r0 = sat[keys[0]][i]
        sat_lines.append(f"| {layer_kind(i)} ({r0['K']}x{r0['N']}) | {r0['cand']} of {r0['K'] // 2 * r0['N']} | "
                         + " | ".join(f"{sat[k][i]['n_sat']} / {sat[k][i]['out_aff']}" for k in keys) + " |")
    tot = {k: (sum(r["n_sat"] for r in sat[k]), sum(r["pairs"] for r in sat[k]), sum(r["out_aff"] for r in sat[k]),
               sum(r["out"] for r in sat[k])) for k in keys}
    sat_lines.append("| **total** | | " + " | ".join(f"**{tot[k][0]} / {tot[k][2]}**" for k in keys) + " |")
    sat_sum = ["| graph | saturated pairs / all pairs | output elements with >= 1 saturated pair / all | MatMuls with any | max abs change / max abs exact output (per call) | max elementwise relative change (elements >= 1% of the call's max) | numpy exact int32 vs ORT (max abs diff) | ORT float output vs numpy (max rel) |",
               "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        n_s, n_p, n_a, n_o = tot[k]
        sat_sum.append(f"| {k} | {n_s} / {n_p} ({n_s / n_p:.2e}) | {n_a} / {n_o} ({n_a / n_o:.2e}) | "
                       f"{sum(1 for r in sat[k] if r['n_sat'])} of {len(sat[k])} | {max(r['rel_max'] for r in sat[k]):.2e} | "
                       f"{max(r['rel_elem'] for r in sat[k]):.2e} | {max(r['check'] for r in sat[k])} | {ycheck[k]:.1e} |")
    sat_note = [f"Emulation of MLAS's AVX2 (non-VNNI) u8s8 kernel as documented by ONNX Runtime (vpmaddubsw: two "
                f"adjacent-k products u8*s8 summed into a saturating int16), not a run on such a CPU; "
                f"{len(sat_texts)} MMLU prompts at batch 1 (32-token recipe), every MatMulInteger's uint8 A input "
                f"captured as an extra graph output; raw uint8 values including the zero point (MLAS corrects the "
                f"A zero point separately with exact column sums)."]
    for ln in sat_sum + [""] + sat_lines + [""] + sat_note:
        print(ln, flush=True)

    # ---- speed (last, after the heavy parts)
    load_sp = os.getloadavg()
    sp = speed_tables(allpaths, ttexts, tok)

    text = "\n".join(
        ["## Graphs"] + g_lines + ["", ship_w, "",
         "## Batch independence (200 MMLU prompts; batched vs batch 1, same graph)"] + bi_lines + ["",
         "## Fidelity"] + fid_lines + ["", "## Accuracy"] + acc + boot + ["",
         "## Saturation on non-VNNI x86 (emulated)"] + sat_sum + [""] + sat_note + [""] + sat_lines + ["",
         "## Speed"] + sp + ["",
         f"onnxruntime {ort.__version__}, onnx {__import__('onnx').__version__}, {os.cpu_count()} cores; 1-min load: "
         f"start {load_start[0]:.2f}, before speed {load_sp[0]:.2f}, end {os.getloadavg()[0]:.2f}. "
         f"Total run time {time.time() - t_start:.0f} s."]) + "\n"
    with open(os.path.join(ROOT, "run_output.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print("\n\n" + text)
    print(f"raw tables in {os.path.join(ROOT, 'run_output.md')}")


if __name__ == "__main__":
    main()
