#!/usr/bin/env python3
"""Regenerate the router results table (RouteLLM's metrics on RouteLLM's data).

    python eval.py                         # score with folds/*.onnx (MMLU) and head.onnx (GSM8K, MT-Bench)
    python eval.py --scores other.jsonl    # metrics of externally computed scores (e.g. the Rust
                                           # evaluator), compared with results/scores.jsonl

MMLU: every question is scored by the fold head that never saw its subject (folds/folds.json).
GSM8K and MT-Bench (evaluation only): scored by head.onnx. Prints a markdown table and writes
results/results.md and results/scores.jsonl ({"benchmark", "id", "score"} per prompt).
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import metrics as M  # noqa: E402
import train  # noqa: E402

# RouteLLM paper, Tables 1-3 (arXiv 2406.18665): CPT(50%), CPT(80%), APGR
PAPER = {
    "BERT (paper)": {"mt_bench": (19.58, 34.02, 0.751), "mmlu": (41.30, 72.20, 0.572), "gsm8k": (44.76, 79.09, 0.531)},
    "Causal LLM (paper)": {"mt_bench": (31.50, 48.75, 0.679), "mmlu": (35.49, 70.31, 0.600), "gsm8k": (33.64, 63.26, 0.622)},
    "Matrix factorization (paper)": {"mt_bench": (13.40, 31.31, 0.802), "mmlu": (35.46, 71.40, 0.597), "gsm8k": (38.82, 72.62, 0.565)},
    "SW ranking (paper)": {"mt_bench": (23.21, 36.04, 0.759), "mmlu": (35.40, 71.55, 0.603), "gsm8k": (41.21, 72.20, 0.568)},
}
TARGETS = {"mmlu": 0.65, "gsm8k": 0.65, "mt_bench": 0.80}
BENCHES = [("mmlu", "MMLU"), ("gsm8k", "GSM8K"), ("mt_bench", "MT-Bench")]


def load(data_dir):
    out = {}
    for b, _ in BENCHES:
        rows = train.read_jsonl(os.path.join(data_dir, f"{b}.jsonl"))
        if b == "mt_bench":
            ids = [r["question_id"] for r in rows]
            weak = np.array([r["weak_score"] for r in rows])
            strong = np.array([r["strong_score"] for r in rows])
        else:
            ids = [r["id"] for r in rows]
            weak = np.array([r["weak_correct"] for r in rows], dtype=np.float64)
            strong = np.array([r["strong_correct"] for r in rows], dtype=np.float64)
        out[b] = {"rows": rows, "ids": ids, "texts": [r["prompt"] for r in rows], "weak": weak, "strong": strong}
    return out


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_head(path, X):
    return session(path).run(["score"], {"features": X.astype(np.float32)})[0][:, 0].astype(np.float64)


def our_scores(data, model_dir):
    with open(os.path.join(model_dir, "folds", "folds.json"), encoding="utf-8") as f:
        folds = json.load(f)["folds"]
    fold_of = {s: k for k, fs in enumerate(folds) for s in fs}
    scores = {}
    mm = data["mmlu"]
    X = train.feature_matrix(mm["texts"], "mmlu")
    k_of = np.array([fold_of[r["subject"]] for r in mm["rows"]])
    s = np.zeros(len(X))
    for k in range(len(folds)):
        s[k_of == k] = run_head(os.path.join(model_dir, "folds", f"fold{k}.onnx"), X[k_of == k])
    scores["mmlu"] = s
    for b in ("gsm8k", "mt_bench"):
        scores[b] = run_head(os.path.join(model_dir, "head.onnx"), train.feature_matrix(data[b]["texts"], b))
    return scores


def fmt(m):
    return f"{m[0]:.2f} / {m[1]:.2f} / {m[2]:.3f}"


def table(data, scores):
    rows = []

    def add(name, per_bench):
        rows.append(f"| {name} | " + " | ".join(fmt(per_bench[b]) for b, _ in BENCHES) + " |")

    res = {}
    for b, _ in BENCHES:
        d = data[b]
        m = M.metrics(scores[b], d["weak"], d["strong"])
        res[b] = (m["cpt50"], m["cpt80"], m["apgr"])
    add("**tiergate router (ours)**", res)
    add("prompt length (characters)", {b: tuple(M.metrics([len(t) for t in data[b]["texts"]], data[b]["weak"],
                                                          data[b]["strong"])[k] for k in ("cpt50", "cpt80", "apgr"))
                                       for b, _ in BENCHES})
    add("random (mean of 10 seeds)", {b: tuple(M.random_metrics(len(data[b]["texts"]), data[b]["weak"],
                                                                data[b]["strong"])[k] for k in ("cpt50", "cpt80", "apgr"))
                                      for b, _ in BENCHES})
    for name, p in PAPER.items():
        add(name, p)
    head = ("| router | " + " | ".join(f"{n} CPT50 / CPT80 / APGR" for _, n in BENCHES) + " |\n"
            "|---|---|---|---|")
    out = [head] + rows
    out += ["", "APGR with 95% paired bootstrap CIs (items resampled with replacement, 2000 resamples, seed 0):", "",
            "| benchmark | ours | prompt length | ours - length | P(ours <= length) |", "|---|---|---|---|---|"]
    for b, n in BENCHES:
        d = data[b]
        length = np.array([len(t) for t in d["texts"]], dtype=np.float64)
        (o, l), diff = M.bootstrap_apgr([scores[b], length], d["weak"], d["strong"])
        ml = M.metrics(length, d["weak"], d["strong"])["apgr"]
        out.append(f"| {n} ({len(d['texts'])}) | {res[b][2]:.3f} [{o[0]:.3f}, {o[1]:.3f}] | {ml:.3f} [{l[0]:.3f}, {l[1]:.3f}] "
                   f"| {res[b][2] - ml:+.3f} [{diff[0]:+.3f}, {diff[1]:+.3f}] | {diff[2]:.3f} |")
    out.append("")
    mt = data["mt_bench"]
    status = []
    for b, n in BENCHES:
        ok = "met" if res[b][2] > TARGETS[b] else "NOT met"
        status.append(f"{n} {res[b][2]:.3f} vs target > {TARGETS[b]:.2f}: {ok}")
    out.append("Targets: " + "; ".join(status) + ".")
    out.append(f"MMLU: 5-fold cross-validation grouped by subject ({len(data['mmlu']['texts'])} questions); "
               f"GSM8K ({len(data['gsm8k']['texts'])}) and MT-Bench ({len(mt['texts'])}) are evaluation-only, "
               "scored by the final head.")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--model-dir", default=HERE)
    ap.add_argument("--scores", help="JSONL of {benchmark, id, score} to evaluate instead of running the heads")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--write", action="store_true", help="with --scores: also write the table to <out>/results.md")
    a = ap.parse_args()
    data = load(a.data)
    ref_path = os.path.join(a.out, "scores.jsonl")
    if a.scores:
        given = {(r["benchmark"], str(r["id"])): float(r["score"]) for r in train.read_jsonl(a.scores)}
        scores = {b: np.array([given[(b, str(i))] for i in data[b]["ids"]]) for b, _ in BENCHES}
        if os.path.exists(ref_path):
            ref = {(r["benchmark"], str(r["id"])): float(r["score"]) for r in train.read_jsonl(ref_path)}
            diff = max(abs(given[k] - ref[k]) for k in ref)
            print(f"max |score - reference score| over {len(ref)} prompts: {diff:.2e}")
        t = table(data, scores)
        if a.write:
            with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
                f.write(t + "\n")
        print(t)
        return
    scores = our_scores(data, a.model_dir)
    os.makedirs(a.out, exist_ok=True)
    with open(ref_path, "w", encoding="utf-8") as f:
        for b, _ in BENCHES:
            for i, s in zip(data[b]["ids"], scores[b]):
                f.write(json.dumps({"benchmark": b, "id": i, "score": round(float(s), 7)}) + "\n")
    t = table(data, scores)
    with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(t + "\n")
    print(t)


if __name__ == "__main__":
    main()
