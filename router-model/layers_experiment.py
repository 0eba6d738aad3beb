#!/usr/bin/env python3
"""Research experiment (issue 3): does the MiniLM pass the router already pays for carry more
than its last layer says? Nothing here changes the shipped router.

    ~/.cache/tiergate/venv-router/bin/python layers_experiment.py     # writes results/layers.md

The shipped features mean-pool the encoder's last layer. This adds the outputs of the embedding
LayerNorm and of every transformer layer (`layer_norm`, `layer_norm_2` … `layer_norm_10`,
`last_hidden_state` in the provisioned int8 graph) as graph outputs, pools each the same way
(mean over real tokens, same 32-token recipe as features.py), and fits the shipped head
(train.fit_head: soft gain label, no intercept, C = 1e-4, length weight 10, hand-written rows
weight 3) on single layers, concatenations (each layer L2-normalised) and the layer average.
All of them cost the same single encoder pass as the shipped features (a single lower layer
would even allow cutting the pass short).

Chosen on, as train.py: MMLU 5-fold CV grouped by subject (APGR) and 5-fold CV AUC on the
hand-written set. GSM8K and MT-Bench are scored by a head fitted on all training rows and are
printed beside, never used for a choice. Extraction ~4 min on 2 cores (cached in
$TIERGATE_CACHE/features/layers-*.npz), each variant ~20 s (concatenating all layers ~2 min).
"""
import hashlib
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eval as E  # noqa: E402
import features as F  # noqa: E402
import metrics as M  # noqa: E402
import train as T  # noqa: E402

LAYERS = ["layer_norm", "layer_norm_2", "layer_norm_4", "layer_norm_6", "layer_norm_8", "layer_norm_10",
          "last_hidden_state"]   # embeddings, then the output of transformer layers 1..6


def layer_encoder():
    """The shipped encoder with every layer's output added to the graph's outputs."""
    import onnx
    m = onnx.load(F.MODEL_PATH)
    have = {o.name for o in m.graph.output}
    for n in LAYERS:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return F.Encoder(m.SerializeToString())


def pooled_layers(texts, name, enc, tok):
    """[N, len(LAYERS), 384] mean-pooled states, cached by model, tokenizer and texts."""
    key = hashlib.sha256(F._file_sha(F.MODEL_PATH).encode() + F._file_sha(F.TOKENIZER_PATH).encode())
    key.update(f"{F.MAX_TOKENS}/{F.HEAD_TOKENS}/{F.CHAR_HEAD}/{F.CHAR_TAIL}/{','.join(LAYERS)}".encode())
    for t in texts:
        key.update(hashlib.sha256(t.encode("utf-8")).digest())
    path = os.path.join(F.CACHE, "features", f"layers-{name}-{key.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        return np.load(path)["h"]
    ids = [F.encode(tok, t) for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), len(LAYERS), F.HIDDEN), np.float32)
    for s in range(0, len(order), 32):
        idx = order[s:s + 32]
        hs, mask = enc.run_outputs([ids[i] for i in idx], LAYERS)
        for k, h in enumerate(hs):
            out[idx, k] = F.pool(h, mask)[0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, h=out)
    return out


def features(H, texts, layers, average):
    h = H[:, layers, :]
    if average:
        e = h.mean(1)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    else:
        e = (h / np.linalg.norm(h, axis=2, keepdims=True)).reshape(len(h), -1)
    return np.hstack([e, F.hand_matrix(texts)]).astype(np.float32)


def auc(score, positive):
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(positive, score))


def main():
    data = E.load(os.path.join(HERE, "data"))
    rows, mtexts, subj, weak, strong = T.load_mmlu(os.path.join(HERE, "data"))
    own = T.read_train_file(os.path.join(HERE, "data", "own_prompts.jsonl"))
    texts = {"mmlu": mtexts, "own": [t for t, _, _ in own],
             "gsm8k": data["gsm8k"]["texts"], "mt_bench": data["mt_bench"]["texts"]}
    enc, tok = layer_encoder(), F.load_tokenizer()
    H = {b: pooled_layers(t, b, enc, tok) for b, t in texts.items()}
    folds = T.assign_folds(subj)
    fold_of = {s: k for k, f in enumerate(folds) for s in f}
    mfold = np.array([fold_of[s] for s in subj])
    tm = (1 + strong - weak) / 2
    to = np.array([l for _, l, _ in own])
    wo = np.full(len(to), T.OWN_WEIGHT)
    own_fold = np.random.default_rng(T.SEED).permutation(len(to)) % T.N_FOLDS

    def run(name, layers, average=False):
        Xm, Xo, Xg, Xt = (features(H[b], texts[b], layers, average) for b in ("mmlu", "own", "gsm8k", "mt_bench"))
        oof = np.zeros(len(Xm))
        for k in range(T.N_FOLDS):
            tr = mfold != k
            w, b = T.fit_head(np.vstack([Xm[tr], Xo]), np.r_[tm[tr], to], np.r_[np.ones(tr.sum()), wo])
            oof[~tr] = Xm[~tr] @ w + b
        own_oof = np.zeros(len(Xo))
        for k in range(T.N_FOLDS):
            tr = own_fold != k
            w, b = T.fit_head(np.vstack([Xm, Xo[tr]]), np.r_[tm, to[tr]], np.r_[np.ones(len(Xm)), wo[tr]])
            own_oof[~tr] = Xo[~tr] @ w + b
        w, b = T.fit_head(np.vstack([Xm, Xo]), np.r_[tm, to], np.r_[np.ones(len(Xm)), wo])
        line = (f"| {name} | {M.metrics(oof, weak, strong)['apgr']:.3f} | {auc(own_oof, to >= 0.5):.3f} "
                f"| {M.metrics(Xg @ w + b, data['gsm8k']['weak'], data['gsm8k']['strong'])['apgr']:.3f} "
                f"| {M.metrics(Xt @ w + b, data['mt_bench']['weak'], data['mt_bench']['strong'])['apgr']:.3f} |")
        print(line, flush=True)
        return line

    lines = ["| features (+ log length) | MMLU grouped CV APGR | hand-written CV AUC | GSM8K APGR | MT-Bench APGR |",
             "|---|---|---|---|---|"]
    lines.append(run("layer 6 (shipped)", [6]))
    for k in range(6):
        lines.append(run("embeddings" if k == 0 else f"layer {k}", [k]))
    lines.append(run("average of layers 1-6", [1, 2, 3, 4, 5, 6], average=True))
    lines.append(run("layers 3 + 6", [3, 6]))
    lines.append(run("layers 4 + 6", [4, 6]))
    lines.append(run("layers 2 + 4 + 6", [2, 4, 6]))
    lines.append(run("all 7", list(range(7))))
    with open(os.path.join(HERE, "results", "layers.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
