#!/usr/bin/env python3
"""Train the tiergate router head and export it as ONNX. One command, fixed seeds:

    python train.py                       # MMLU + data/own_prompts.jsonl
    python train.py --extra my.jsonl      # ... plus your own labelled traffic (same format)

Writes router-model/head.onnx (final head, all training data), router-model/folds/fold{k}.onnx
(k = 0..4, each trained without the MMLU subjects of fold k) and router-model/folds/folds.json
(subjects per fold, feature layout, hyper-parameters, calibration). See FEATURES.md for the
feature vector and README.md for the model card.

Training file format (JSONL, one request per line):
    {"prompt": "text"  |  "messages": [OpenAI chat messages],  "label": 0..1,  "weight": 1.0 (optional)}
label 1 = the strong (cloud) tier is needed, 0 = the cheap tier is fine; fractions are soft labels.
"""
import argparse
import collections
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402

# ---- hyper-parameters (chosen by MMLU grouped CV + CV on the hand-written set, never on
# GSM8K / MT-Bench outcomes; see README "How the design was chosen")
C = 1e-4                 # inverse L2 strength of the logistic head (very strong shrinkage)
OWN_WEIGHT = 3.0         # sample weight of each hand-written / extra row (MMLU rows weigh 1)
LENGTH_WEIGHT = 10.0     # the log-length feature's standardised scale, i.e. its L2 penalty is
                         # 1/LENGTH_WEIGHT^2 of an embedding dimension's (MMLU CV: 1 -> 0.610, 10 -> 0.631)
N_FOLDS = 5
SEED = 0


# ------------------------------------------------------------------ data
def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_train_file(path):
    """-> list of (scored_text, label, weight)."""
    out = []
    for i, r in enumerate(read_jsonl(path)):
        if "messages" in r:
            text = F.scored_text(r["messages"])
        elif "prompt" in r:
            text = r["prompt"]
        else:
            sys.exit(f"{path}:{i + 1}: needs `prompt` or `messages`")
        label = float(r["label"])
        if not 0.0 <= label <= 1.0:
            sys.exit(f"{path}:{i + 1}: `label` must be in [0, 1], got {label}")
        out.append((text, label, float(r.get("weight", 1.0))))
    return out


def load_mmlu(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "mmlu.jsonl"))
    texts = [r["prompt"] for r in rows]
    subj = np.array([r["subject"] for r in rows])
    weak = np.array([r["weak_correct"] for r in rows], dtype=np.float64)
    strong = np.array([r["strong_correct"] for r in rows], dtype=np.float64)
    return rows, texts, subj, weak, strong


def assign_folds(subjects, n_folds=N_FOLDS):
    """Deterministic, size-balanced grouping: subjects by descending size (ties by name), each
    into the fold with the fewest questions so far (lowest fold index on ties)."""
    cnt = collections.Counter(subjects)
    folds, sizes = [[] for _ in range(n_folds)], [0] * n_folds
    for s, c in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])):
        k = int(np.argmin(sizes))
        folds[k].append(str(s))
        sizes[k] += c
    return [sorted(f) for f in folds]


# ------------------------------------------------------------------ features
def feature_matrix(texts, name, graph=None):
    """[N, D] float32: L2-normalised mean-pooled MiniLM embedding (384) ++ hand features.
    graph: the encoder graph (default: the one served on this CPU, see features.served_graph)."""
    e = F.embed_cached(texts, name, graph=graph)["mean"]
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return np.hstack([e, F.hand_matrix(texts)]).astype(np.float32)


FEATURE_NAMES = [f"emb_mean_l2[{i}]" for i in range(F.HIDDEN)] + F.HAND_NAMES


# ------------------------------------------------------------------ model
def fit_head(X, target, weight, length_weight=None):
    """Logistic regression with soft targets, no intercept, on standardised features, the last
    one (log length) scaled by `length_weight` so the shared L2 penalty shrinks it less: one
    feature among 384 embedding dimensions otherwise gets the same small budget as each.
    Returns (w_eff [D], b_eff) such that z = X @ w_eff + b_eff (scaler folded in)."""
    from sklearn.linear_model import LogisticRegression
    length_weight = LENGTH_WEIGHT if length_weight is None else length_weight
    mu = np.average(X, axis=0, weights=weight)
    sd = np.sqrt(np.average((X - mu) ** 2, axis=0, weights=weight))
    sd[sd < 1e-8] = 1.0
    sd[-1] /= length_weight
    Xs = (X - mu) / sd
    # soft-label cross-entropy == weighted binary LR on (x, 1) with weight t*w and (x, 0) with (1-t)*w
    Xd = np.vstack([Xs, Xs])
    yd = np.concatenate([np.ones(len(X)), np.zeros(len(X))])
    wd = np.concatenate([target * weight, (1 - target) * weight])
    m = LogisticRegression(C=C, fit_intercept=False, max_iter=5000, tol=1e-8, random_state=SEED)
    m.fit(Xd, yd, sample_weight=wd)
    w = m.coef_[0] / sd
    return w, float(-(mu * w).sum())


def fit_platt(z, event, weight):
    """1-D logistic calibration: P(event) = sigmoid(a z + b)."""
    from sklearn.linear_model import LogisticRegression
    m = LogisticRegression(C=1e6, max_iter=5000, tol=1e-10)
    m.fit(z[:, None], event, sample_weight=weight)
    return float(m.coef_[0, 0]), float(m.intercept_[0])


def export_onnx(path, w, b, a_cal, b_cal, meta):
    """score = sigmoid(a_cal * (x . w + b) + b_cal) as one Gemm + Sigmoid; [N, D] -> [N, 1]."""
    import onnx
    from onnx import TensorProto, helper
    W = (a_cal * w).astype(np.float32)[None, :]
    B = np.array([a_cal * b + b_cal], dtype=np.float32)
    D = W.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W", "B"], ["logit"], transB=1),
         helper.make_node("Sigmoid", ["logit"], ["score"])],
        "tiergate_router_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.flatten().tolist()),
         helper.make_tensor("B", TensorProto.FLOAT, B.shape, B.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="tiergate-router-model")
    model.ir_version = 8
    for k, v in meta.items():
        e = model.metadata_props.add()
        e.key, e.value = k, str(v)
    onnx.checker.check_model(model)
    onnx.save(model, path)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--own", default=os.path.join(HERE, "data", "own_prompts.jsonl"),
                    help="hand-written labelled prompts ('' to train on MMLU only)")
    ap.add_argument("--extra", action="append", default=[], help="more labelled JSONL files (your traffic)")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    np.random.seed(SEED)

    import dedup
    rows, mtexts, subj, weak, strong = load_mmlu(a.data)
    folds = assign_folds(subj)
    fold_of = {s: k for k, f in enumerate(folds) for s in f}
    mfold = np.array([fold_of[s] for s in subj])

    extra = []
    for p in ([a.own] if a.own else []) + a.extra:
        extra += read_train_file(p)
    etexts = [t for t, _, _ in extra]
    if extra:   # refuse training rows that (nearly) duplicate a benchmark prompt
        bench, eb = dedup.benchmark_texts_and_embeddings(a.data)
        ee = F.embed_cached(etexts, "extra", verbose=False)["mean"]
        found, _ = dedup.near_duplicates(etexts, bench, ee / np.linalg.norm(ee, axis=1, keepdims=True), eb)
        for i, why, b in found:
            print(f"dropping extra row {i} ({why} to a benchmark prompt): {etexts[i][:70]!r}")
        drop = {i for i, _, _ in found}
        extra = [r for i, r in enumerate(extra) if i not in drop]
        etexts = [t for t, _, _ in extra]
    print(f"training rows: MMLU {len(mtexts)}, extra {len(extra)}")

    Xm = feature_matrix(mtexts, "mmlu")
    tm = (1.0 + strong - weak) / 2.0          # soft target: 0.5 + half the accuracy gain of escalating
    em = (1.0 - weak) * strong                # calibration event: weak wrong and strong right
    wm = np.ones(len(mtexts))
    if extra:
        Xe = feature_matrix(etexts, "extra")
        te = np.array([l for _, l, _ in extra])
        we = np.array([w for _, _, w in extra]) * OWN_WEIGHT
    else:
        Xe, te, we = np.zeros((0, Xm.shape[1]), np.float32), np.zeros(0), np.zeros(0)
    X = np.vstack([Xm, Xe])
    T = np.concatenate([tm, te])
    W = np.concatenate([wm, we])
    E = np.concatenate([em, (te >= 0.5).astype(float)])

    w, b = fit_head(X, T, W)
    a_cal, b_cal = fit_platt(X @ w + b, E, W)
    meta = {"features": "see FEATURES.md", "dim": X.shape[1], "max_tokens": F.MAX_TOKENS,
            "head_tokens": F.HEAD_TOKENS, "C": C, "own_weight": OWN_WEIGHT, "length_weight": LENGTH_WEIGHT,
            "output": "P(escalating to the strong tier changes a wrong answer into a right one)"}
    export_onnx(os.path.join(a.out, "head.onnx"), w, b, a_cal, b_cal, {**meta, "trained_on": "all"})
    print(f"head.onnx: D={X.shape[1]}, calibration a={a_cal:.4f} b={b_cal:.4f}")

    # per-fold heads for the MMLU cross-validation (same extra rows in every fold; the final
    # head's calibration is reused so pooled out-of-fold scores rank exactly like the raw logits)
    os.makedirs(os.path.join(a.out, "folds"), exist_ok=True)
    for k in range(N_FOLDS):
        tr = mfold != k
        wk, bk = fit_head(np.vstack([Xm[tr], Xe]), np.concatenate([tm[tr], te]), np.concatenate([wm[tr], we]))
        export_onnx(os.path.join(a.out, "folds", f"fold{k}.onnx"), wk, bk, a_cal, b_cal,
                    {**meta, "trained_on": f"all except MMLU fold {k}"})
    with open(os.path.join(a.out, "folds", "folds.json"), "w", encoding="utf-8") as f:
        json.dump({"n_folds": N_FOLDS, "folds": folds,
                   "fold_sizes": [int((mfold == k).sum()) for k in range(N_FOLDS)],
                   "feature_names": FEATURE_NAMES,
                   "hyperparameters": {"C": C, "own_weight": OWN_WEIGHT, "length_weight": LENGTH_WEIGHT},
                   "calibration": {"a": a_cal, "b": b_cal},
                   "extra_rows": len(extra)}, f, indent=1)
        f.write("\n")
    print("wrote folds/fold{0..4}.onnx and folds/folds.json")


if __name__ == "__main__":
    main()
