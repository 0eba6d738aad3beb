#!/usr/bin/env python3
"""Research: route by the gain of the *training subjects* a prompt resembles (kernel regression at
subject level), alone and blended with the shipped head. MMLU grouped CV only (the protocol's
training data); nothing from GSM8K or MT-Bench is read.

For each held-out fold: every training subject s gets a centroid c_s (mean of its L2-normalised
embeddings, renormalised) and its mean soft gain g_s; a held-out prompt x scores
sum_s softmax_s(tau * cos(x, c_s)) * g_s. Blends average the ranks of this score and the head's
out-of-fold score (results/scores.jsonl). Prints MMLU grouped-CV APGR for a few tau and weights.

    python subject_kernel_experiment.py        # ~1 min with the feature cache warm
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import metrics as M  # noqa: E402
import train as T  # noqa: E402


def main():
    rows, texts, subj, weak, strong = T.load_mmlu(os.path.join(HERE, "data"))
    fold_of = {s: k for k, f in enumerate(T.assign_folds(subj)) for s in f}
    fold = np.array([fold_of[s] for s in subj])
    X = T.feature_matrix(texts, "mmlu")
    emb, gain = X[:, :384], (1 + strong - weak) / 2
    oof = {}
    for line in open(os.path.join(HERE, "results", "scores.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        if r["benchmark"] == "mmlu":
            oof[r["id"]] = r["score"]
    head = np.array([oof[r["id"]] for r in rows])

    def apgr(s):
        return M.metrics(s, weak, strong)["apgr"]

    def rank(v):
        return np.argsort(np.argsort(v, kind="stable"), kind="stable") / len(v)

    print(f"| variant | MMLU grouped CV APGR |\n|---|---|\n| shipped head (out-of-fold) | {apgr(head):.3f} |")
    subjects = sorted(set(subj))
    for tau in (5, 10, 20, 50, 100):
        score = np.zeros(len(rows))
        for k in range(T.N_FOLDS):
            train = [s for s in subjects if fold_of[s] != k]
            c = np.stack([emb[subj == s].mean(0) for s in train])
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            g = np.array([gain[subj == s].mean() for s in train])
            te = fold == k
            z = emb[te] @ c.T * tau
            w = np.exp(z - z.max(1, keepdims=True))
            score[te] = (w / w.sum(1, keepdims=True)) @ g
        print(f"| subject kernel, tau {tau} | {apgr(score):.3f} |")
        for a in (0.25, 0.5):
            print(f"| rank blend: head {1 - a:.2f} + subject kernel (tau {tau}) {a:.2f} | "
                  f"{apgr((1 - a) * rank(head) + a * rank(score)):.3f} |")


if __name__ == "__main__":
    main()
