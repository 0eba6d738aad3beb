#!/usr/bin/env python3
"""Research experiment (issue 3): do features from the local decoder LM predict the escalation gain
better than the shipped MiniLM features?  Nothing here changes the shipped router.

    ~/.cache/tiergate/venv-router/bin/python lm_features_experiment.py            # SmolLM2-135M
    ... lm_features_experiment.py --model qwen2.5-coder-0.5b-instruct --depths 6,12,24

What it does
  1. Graph surgery (onnx, external data not loaded): a copy of the provisioned Optimum decoder
     (~/.cache/tiergate/models/<model>/model.onnx, never modified) with the residual stream after
     chosen depths added as graph outputs (`/model.layers.{d-1}/mlp_residual_out0`; the final
     depth uses the final RMSNorm output `/model/norm/Mul_out0`), `present.*` outputs dropped.
     Written to /tmp/lmfeat/<model>/ beside a hard link to (or copy of) the original
     model.onnx_data (ONNX Runtime rejects a symlink that resolves outside the model's folder).
     A second copy cut after depth --cut-depth (nodes not needed for that output pruned) is
     used only to time a truncated-depth extractor.
  2. Text fed to the LM: the router's scored text (features.scored_text: system + "\\n\\n" + last
     user; benchmarks: the prompt), RAW (no chat template, no BOS), after features.char_window,
     tokenised without special tokens and cut to head --head + tail (--max-tokens - --head) tokens.
  3. Per prompt (cached in /tmp/lmfeat/<model>-<key>/<dataset>.npz): for each depth the mean over
     token positions 1..T-1 (position 0 carries the attention-sink outlier activations; all
     positions if T == 1) and the last token's state; from the logits: mean log-prob of the
     prompt's own tokens, mean and last-position entropy of the next-token distribution, and T.
     Batches of 8 prompts sorted by length, right-padded (causal attention: real tokens never
     see the padding; the dynamic int8 quantisation scales do see it, so batched features differ
     from batch-1 ones by quantisation rounding).
  4. Heads exactly as train.py: soft gain label, standardised features, logistic regression
     without intercept (train.fit_head), MMLU rows weight 1 + data/own_prompts.jsonl weight 3,
     MMLU 5-fold CV grouped by subject (train.assign_folds), APGR by metrics.py. C is chosen per
     variant on MMLU grouped-CV APGR only. GSM8K / MT-Bench are scored by a head refitted on all
     training rows with that C and are evaluation-only (reported, never used for a choice).
  5. Extraction cost per prompt at batch 1 (2 intra-op threads): MiniLM (32 tokens, shipped),
     the full LM feature graph and the depth-cut graph, on the same prompts in one run.

Takes (2 cores, shared with builds): SmolLM2 extraction 27 min for 15.6k prompts at 64 tokens
(~90 ms/prompt batched under load, ~64 ms when quieter), the CV grid + bootstrap + timing ~4 min;
reruns reuse the /tmp/lmfeat caches (then ~4 min). --report reprints the tables from the JSON.
Writes results/lm_features_<model>.json (all numbers) and
prints the tables used in results/lm_features.md.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402
import metrics as M  # noqa: E402
import train  # noqa: E402

SCRATCH = "/tmp/lmfeat"
C_GRID = [1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
BENCHES = ["mmlu", "gsm8k", "mt_bench"]


# ------------------------------------------------------------------ graph surgery
def depth_tensor(depth, n_layers):
    return "/model/norm/Mul_out0" if depth == n_layers else f"/model.layers.{depth - 1}/mlp_residual_out0"


def prune(graph, keep_outputs):
    """Keep only nodes needed for `keep_outputs`; drop unused graph inputs and initializers."""
    producer = {o: n for n in graph.node for o in n.output}
    need, stack, keep = set(), list(keep_outputs), set()
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(i for i in n.input if i)
            for a in n.attribute:   # subgraphs are not expected in these exports
                assert a.type not in (5, 10), "subgraph attribute"
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    for coll in (graph.input, graph.initializer):
        kept = [x for x in coll if x.name in need]
        del coll[:]
        coll.extend(kept)


def build_graph(model_dir, out_dir, depths, n_layers, hidden, with_logits, name):
    import onnx
    from onnx import TensorProto, helper
    os.makedirs(out_dir, exist_ok=True)
    link = os.path.join(out_dir, "model.onnx_data")
    if not os.path.exists(link):   # ORT refuses a symlink that leaves the model's directory
        src = os.path.join(model_dir, "model.onnx_data")
        try:
            os.link(src, link)
        except OSError:
            import shutil
            shutil.copyfile(src, link)
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        return path
    m = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    g = m.graph
    outs = [o for o in g.output if o.name == "logits"] if with_logits else []
    del g.output[:]
    g.output.extend(outs)
    for d in depths:
        g.output.append(helper.make_tensor_value_info(depth_tensor(d, n_layers), TensorProto.FLOAT,
                                                      ["batch", "seq", hidden]))
    prune(g, [o.name for o in g.output])
    onnx.save(m, path)   # external-data references stay relative: resolved via the symlink
    return path


def session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class LM:
    def __init__(self, path, cfg, threads):
        self.sess = session(path, threads)
        self.in_names = {i.name for i in self.sess.get_inputs()}
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.n_kv, self.head_dim = cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    def run(self, batch_ids):
        B, T = len(batch_ids), max(len(x) for x in batch_ids)
        ids = np.zeros((B, T), np.int64)
        mask = np.zeros((B, T), np.int64)
        for i, x in enumerate(batch_ids):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        feed = {"input_ids": ids, "attention_mask": mask,
                "position_ids": np.tile(np.arange(T, dtype=np.int64), (B, 1))}
        for n in self.in_names:
            if n.startswith("past_key_values"):
                feed[n] = np.zeros((B, self.n_kv, 0, self.head_dim), np.float32)
        feed = {k: v for k, v in feed.items() if k in self.in_names}
        return dict(zip(self.out_names, self.sess.run(self.out_names, feed))), mask


def lm_tokens(tok, text, max_tokens, head):
    ids = tok.encode(F.char_window(text), add_special_tokens=False).ids
    if len(ids) > max_tokens:
        ids = ids[:head] + ids[len(ids) - (max_tokens - head):]
    return ids or [0]   # empty text: one <|endoftext|> token so the graph gets T >= 1


def logit_stats(logits, ids, n):
    """logits [T,V] of one prompt (n real tokens) -> mean log-prob of tokens 1..n-1, mean entropy
    over positions 0..n-1, entropy at the last position."""
    z = logits[:n].astype(np.float64)
    z -= z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1, keepdims=True))
    lp = z - lse
    ent = -(np.exp(lp) * lp).sum(1)
    mlp = float(np.mean(lp[np.arange(n - 1), ids[1:n]])) if n > 1 else 0.0
    return [mlp, float(ent.mean()), float(ent[-1])]


def extract(lm, tok, texts, depths, n_layers, a, label):
    ids = [lm_tokens(tok, t, a.max_tokens, a.head) for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    H = lm.sess.get_outputs()[-1].shape[-1]
    out = {f"mean{d}": np.zeros((len(texts), H), np.float32) for d in depths}
    out.update({f"last{d}": np.zeros((len(texts), H), np.float32) for d in depths})
    out["lmstats"] = np.zeros((len(texts), 3), np.float32)
    t0 = time.perf_counter()
    for s in range(0, len(order), a.batch):
        idx = order[s:s + a.batch]
        res, mask = lm.run([ids[i] for i in idx])
        for j, i in enumerate(idx):
            n = len(ids[i])
            for d in depths:
                h = res[depth_tensor(d, n_layers)][j, :n]
                out[f"mean{d}"][i] = h[1:].mean(0) if n > 1 else h[0]
                out[f"last{d}"][i] = h[n - 1]
            out["lmstats"][i] = logit_stats(res["logits"][j], ids[i], n)
        if (s // a.batch) % 200 == 0:
            el = time.perf_counter() - t0
            print(f"  {label}: {s}/{len(order)}  {el:.0f}s", flush=True)
    out["ntok"] = np.array([len(x) for x in ids], np.float32)
    out["seconds"] = np.array(time.perf_counter() - t0)
    return out


def cached_extract(a, lm_factory, tok, name, texts, depths, n_layers, key):
    d = os.path.join(SCRATCH, key)
    os.makedirs(d, exist_ok=True)
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    path = os.path.join(d, f"{name}-{h.hexdigest()[:12]}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {k: z[k] for k in z.files}
    out = extract(lm_factory(), tok, texts, depths, n_layers, a, name)
    np.savez(path, **out)
    print(f"  {name}: {len(texts)} prompts in {float(out['seconds']):.0f}s", flush=True)
    return out


# ------------------------------------------------------------------ heads and CV
def fit_head(X, target, weight, c, w0=None):
    """train.fit_head's model (soft-label logistic regression, no intercept, features standardised
    with the weighted mean/sd) minimised directly with L-BFGS, without train.py's row duplication:
    0.5 |w|^2 + C * sum_i weight_i * CE(target_i, sigmoid(x_i . w)) is the same objective, so the
    same optimum (checked against train.fit_head by --check-fit). Warm start w0 (standardised
    space) makes a C path cheap. Returns (w_eff, b_eff, w_std)."""
    from scipy.optimize import minimize
    mu = np.average(X, axis=0, weights=weight)
    sd = np.sqrt(np.average((X - mu) ** 2, axis=0, weights=weight))
    sd[sd < 1e-8] = 1.0
    Xs = (X - mu) / sd

    def f(w):
        z = Xs @ w
        # CE(t, sigmoid(z)) = logaddexp(0, z) - t z
        loss = weight * (np.logaddexp(0.0, z) - target * z)
        g = Xs.T @ (weight * (0.5 * (1.0 + np.tanh(0.5 * z)) - target))
        return 0.5 * w @ w + c * loss.sum(), w + c * g

    w0 = np.zeros(X.shape[1]) if w0 is None else w0
    r = minimize(f, w0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-7, "ftol": 1e-12})
    w = r.x / sd
    return w, float(-(mu * w).sum()), r.x


def cv_path(Xm, tm, mfold, Xe, te, we, c_grid):
    """-> {C: out-of-fold MMLU logits} for every C (each fold: C path from strong to weak L2)."""
    out = {c: np.zeros(len(Xm)) for c in c_grid}
    for k in range(train.N_FOLDS):
        tr = mfold != k
        Xt, tt = np.vstack([Xm[tr], Xe]), np.concatenate([tm[tr], te])
        wt = np.concatenate([np.ones(tr.sum()), we])
        ws = None
        for c in sorted(c_grid):
            w, b, ws = fit_head(Xt, tt, wt, c, ws)
            out[c][~tr] = Xm[~tr] @ w + b
    return out


def final_head(Xm, tm, Xe, te, we, c):
    return fit_head(np.vstack([Xm, Xe]), np.concatenate([tm, te]), np.concatenate([np.ones(len(Xm)), we]), c)[:2]


def timing(a, paths, cfg, tok, texts, minilm_n=100):
    """Batch-1 extraction cost per prompt, same prompts, interleaved per prompt."""
    enc = F.Encoder(threads=a.threads)
    mtok = F.load_tokenizer()
    lms = {k: LM(p, cfg, a.threads) for k, p in paths.items()}
    ts = {k: [] for k in ["minilm32", *lms]}
    sample = texts[:minilm_n]
    for rep in range(2):   # first pass = warm-up
        for t in sample:
            t0 = time.perf_counter()
            h, m = enc.run([F.encode(mtok, t)])
            F.pool(h, m)
            t1 = time.perf_counter()
            if rep:
                ts["minilm32"].append(t1 - t0)
            for k, lm in lms.items():
                t0 = time.perf_counter()
                lm.run([lm_tokens(tok, t, a.max_tokens, a.head)])
                t1 = time.perf_counter()
                if rep:
                    ts[k].append(t1 - t0)
    return {k: {"p50_ms": 1e3 * float(np.median(v)), "p90_ms": 1e3 * float(np.percentile(v, 90))} for k, v in ts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--depths", default="4,8,16,30")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--head", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cut-depth", type=int, default=8, help="depth of the truncated graph that is timed")
    ap.add_argument("--limit", type=int, default=0, help="only time extraction on this many MMLU prompts and exit")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--report", action="store_true", help="print the tables of results/lm_features_<model>.json and exit")
    ap.add_argument("--check-fit", action="store_true",
                    help="compare fit_head with train.fit_head on the shipped MMLU features at C=1e-4 and exit")
    a = ap.parse_args()
    from tokenizers import Tokenizer
    if a.report:
        print(report(os.path.join(HERE, "results", f"lm_features_{a.model}.json")))
        return
    if a.check_fit:
        _, texts, _, weak, strong = train.load_mmlu(os.path.join(HERE, "data"))
        Xc, tc = train.feature_matrix(texts, "mmlu").astype(np.float64), (1 + strong - weak) / 2
        train.C = 1e-4
        w1, b1 = train.fit_head(Xc, tc, np.ones(len(Xc)), length_weight=1.0)
        w2, b2, _ = fit_head(Xc, tc, np.ones(len(Xc)), 1e-4)
        print(f"max |logit(train.fit_head) - logit(fit_head)| = {np.abs(Xc @ w1 + b1 - Xc @ w2 - b2).max():.2e}")
        return

    mdir = os.path.join(F.CACHE, "models", a.model)
    with open(os.path.join(mdir, "config.json")) as f:
        cfg = json.load(f)
    n_layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    depths = [int(x) for x in a.depths.split(",")]
    gdir = os.path.join(SCRATCH, a.model)
    full = build_graph(mdir, gdir, depths, n_layers, hidden, True, "feat_" + "_".join(map(str, depths)) + ".onnx")
    cut = build_graph(mdir, gdir, [a.cut_depth], n_layers, hidden, False, f"cut_{a.cut_depth}.onnx")
    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()

    data = {}
    for b in BENCHES:
        rows = train.read_jsonl(os.path.join(HERE, "data", f"{b}.jsonl"))
        if b == "mt_bench":
            weak = np.array([r["weak_score"] for r in rows], np.float64)
            strong = np.array([r["strong_score"] for r in rows], np.float64)
        else:
            weak = np.array([r["weak_correct"] for r in rows], np.float64)
            strong = np.array([r["strong_correct"] for r in rows], np.float64)
        data[b] = {"rows": rows, "texts": [r["prompt"] for r in rows], "weak": weak, "strong": strong}
    own = train.read_train_file(os.path.join(HERE, "data", "own_prompts.jsonl"))
    otexts = [t for t, _, _ in own]
    te = np.array([l for _, l, _ in own])
    we = np.array([w for _, _, w in own]) * train.OWN_WEIGHT

    if a.limit:
        lm = LM(full, cfg, a.threads)
        ids_texts = data["mmlu"]["texts"][::max(1, len(data["mmlu"]["texts"]) // a.limit)][:a.limit]
        out = extract(lm, tok, ids_texts, depths, n_layers, a, "probe")
        print(f"{a.limit} prompts: {float(out['seconds']):.1f}s = {1e3 * float(out['seconds']) / a.limit:.1f} ms/prompt "
              f"(mean T {out['ntok'].mean():.1f})")
        return

    key = f"{a.model}-t{a.max_tokens}h{a.head}-d{'_'.join(map(str, depths))}"
    lmf = {}
    for name, texts in [("own", otexts), ("mt_bench", data["mt_bench"]["texts"]), ("gsm8k", data["gsm8k"]["texts"]),
                        ("mmlu", data["mmlu"]["texts"])]:
        lmf[name] = cached_extract(a, lambda: LM(full, cfg, a.threads), tok, name, texts, depths, n_layers, key)
    extract_s = {k: float(v["seconds"]) for k, v in lmf.items()}

    # ---- feature blocks per dataset
    mini = {"mmlu": train.feature_matrix(data["mmlu"]["texts"], "mmlu"), "own": train.feature_matrix(otexts, "extra"),
            "gsm8k": train.feature_matrix(data["gsm8k"]["texts"], "gsm8k"),
            "mt_bench": train.feature_matrix(data["mt_bench"]["texts"], "mt_bench")}
    texts_of = {"mmlu": data["mmlu"]["texts"], "own": otexts, "gsm8k": data["gsm8k"]["texts"],
                "mt_bench": data["mt_bench"]["texts"]}

    def block(ds, kind):
        z, n = lmf[ds], None
        loglen = F.hand_matrix(texts_of[ds])
        if kind == "minilm":
            return mini[ds]
        if kind == "loglen":
            return loglen
        if kind == "lmstats":
            return np.hstack([z["lmstats"], np.log(z["ntok"])[:, None], loglen])
        if kind.startswith("mean") or kind.startswith("last"):
            return np.hstack([z[kind], loglen])
        if kind.startswith("ml"):   # mean + last at one depth
            d = kind[2:]
            return np.hstack([z[f"mean{d}"], z[f"last{d}"], loglen])
        raise ValueError(kind)

    variants = [("log length only (head, same protocol)", ["loglen"]),
                (SHIPPED, ["minilm"]),
                (SHIPPED_C, ["minilm"]),
                ("LM stats: mean log-prob, mean/last entropy, log T + log length", ["lmstats"])]
    variants += [(f"LM mean-pooled depth {d} + log length", [f"mean{d}"]) for d in depths]
    variants += [(f"LM last-token depth {d} + log length", [f"last{d}"]) for d in (depths[1], depths[-1])]
    variants += [("MiniLM + LM stats", ["minilm", "lmstats"])]
    # + "MiniLM + LM mean at depth d*" and "MiniLM + LM last-token at depth d*", d* = best depth of
    # that pooling on MMLU CV (added in the loop)

    def X(ds, kinds):
        return np.hstack([block(ds, k) for k in kinds]).astype(np.float64)

    mm = data["mmlu"]
    folds = train.assign_folds(np.array([r["subject"] for r in mm["rows"]]))
    fold_of = {s: k for k, f in enumerate(folds) for s in f}
    mfold = np.array([fold_of[r["subject"]] for r in mm["rows"]])
    tm = (1.0 + mm["strong"] - mm["weak"]) / 2.0

    results = {"model": a.model, "depths": depths, "max_tokens": a.max_tokens, "head": a.head,
               "extract_seconds": extract_s, "variants": {}}
    base = {b: M.metrics([len(t) for t in data[b]["texts"]], data[b]["weak"], data[b]["strong"])["apgr"] for b in BENCHES}
    results["prompt_length_chars"] = base
    print(f"prompt length (characters): MMLU {base['mmlu']:.3f} GSM8K {base['gsm8k']:.3f} MT-Bench {base['mt_bench']:.3f}")
    oof = {}
    while variants:
        name, kinds = variants.pop(0)
        t0 = time.perf_counter()
        Xm, Xe = X("mmlu", kinds), X("own", kinds)
        path = cv_path(Xm, tm, mfold, Xe, te, we, C_GRID)
        grid = {c: M.metrics(z, mm["weak"], mm["strong"])["apgr"] for c, z in path.items()}
        cbest = 1e-4 if name == SHIPPED_C else max(C_GRID, key=lambda c: grid[c])   # chosen on MMLU grouped CV only
        w, b = final_head(Xm, tm, Xe, te, we, cbest)
        ev = {bn: M.metrics(X(bn, kinds) @ w + b, data[bn]["weak"], data[bn]["strong"])["apgr"]
              for bn in ("gsm8k", "mt_bench")}
        own_auc = auc(X("own", kinds) @ w + b, te)
        oof[name] = {"mmlu": path[cbest], **{bn: X(bn, kinds) @ w + b for bn in ("gsm8k", "mt_bench")}}
        results["variants"][name] = {"kinds": kinds, "dim": Xm.shape[1], "cv_by_C": grid, "C": cbest,
                                     "mmlu_cv": grid[cbest], "mmlu_cv_at_shipped_C": grid[1e-4], **ev,
                                     "own_auc_in_sample": own_auc}
        # GSM8K / MT-Bench are not printed here: they only appear in report(), after the choice
        print(f"{name:62s} D={Xm.shape[1]:5d} C*={cbest:.0e} MMLU-CV {grid[cbest]:.3f} (C=1e-4: {grid[1e-4]:.3f}) "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        if name == "MiniLM + LM stats":
            dbest = max(depths, key=lambda d: results["variants"][f"LM mean-pooled depth {d} + log length"]["mmlu_cv"])
            variants.append((f"MiniLM + LM mean depth {dbest}", ["minilm", f"mean{dbest}"]))
            lbest = max((depths[1], depths[-1]),
                        key=lambda d: results["variants"][f"LM last-token depth {d} + log length"]["mmlu_cv"])
            variants.append((f"MiniLM + LM last-token depth {lbest}", ["minilm", f"last{lbest}"]))

    # paired bootstrap (items resampled; MMLU: out-of-fold scores) of each chosen variant vs the shipped router
    results["bootstrap_vs_shipped"] = {}
    for n in pick(results["variants"]):
        results["bootstrap_vs_shipped"][n] = {}
        for bn in BENCHES:
            _, diff = M.bootstrap_apgr([oof[n][bn], oof[SHIPPED_C][bn]], data[bn]["weak"], data[bn]["strong"], n_boot=500)
            results["bootstrap_vs_shipped"][n][bn] = diff
    if not a.skip_timing:
        results["timing_batch1"] = timing(a, {"lm_full_graph": full, f"lm_cut_depth{a.cut_depth}": cut}, cfg, tok,
                                          mm["texts"][::140])
        print(json.dumps(results["timing_batch1"], indent=1))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"lm_features_{a.model}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    print(report(path))


SHIPPED = "shipped features: MiniLM-32 + log length"
SHIPPED_C = "shipped router: same features, C = 1e-4 fixed (train.py)"


def pick(variants):
    """The pre-registered choice, on MMLU grouped-CV APGR only: the best LM-only variant and the
    best MiniLM + LM variant (GSM8K / MT-Bench are not looked at)."""
    lm_only = [n for n, v in variants.items() if "minilm" not in v["kinds"] and v["kinds"] != ["loglen"]]
    combo = [n for n, v in variants.items() if "minilm" in v["kinds"] and len(v["kinds"]) > 1]
    return [max(lm_only, key=lambda n: variants[n]["mmlu_cv"]), max(combo, key=lambda n: variants[n]["mmlu_cv"])]


def report(path):
    """Markdown tables from the JSON written by main()."""
    with open(path) as f:
        r = json.load(f)
    V, L = r["variants"], r["prompt_length_chars"]
    out = [f"Model {r['model']}, {r['max_tokens']} tokens (head {r['head']}), depths {r['depths']}.", "",
           "MMLU grouped-CV APGR (C chosen per variant on this column; own AUC = hand-written set, in-sample, final head)", "",
           "| variant | D | C* | MMLU CV APGR | at C=1e-4 | own AUC |", "|---|---|---|---|---|---|",
           f"| prompt length (characters, no head) | - | - | {L['mmlu']:.3f} | - | - |"]
    for n, v in V.items():
        out.append(f"| {n} | {v['dim']} | {float(v['C']):.0e} | {v['mmlu_cv']:.3f} | {v['mmlu_cv_at_shipped_C']:.3f} "
                   f"| {v['own_auc_in_sample']:.3f} |")
    chosen = pick(V)
    out += ["", "Chosen on MMLU CV alone by pick() (best LM-only, best MiniLM + LM; GSM8K / MT-Bench never enter the choice):", "",
            "| router | MMLU CV | GSM8K | MT-Bench |", "|---|---|---|---|",
            f"| prompt length (characters) | {L['mmlu']:.3f} | {L['gsm8k']:.3f} | {L['mt_bench']:.3f} |"]
    for n in [SHIPPED_C, SHIPPED] + chosen:
        v = V[n]
        out.append(f"| {n} | {v['mmlu_cv']:.3f} | {v['gsm8k']:.3f} | {v['mt_bench']:.3f} |")
    if "bootstrap_vs_shipped" in r:
        out += ["", "APGR difference chosen - shipped router (C = 1e-4), 95% paired bootstrap CI, 500 resamples "
                "[lo, hi] and P(diff <= 0):", "", "| variant | MMLU CV | GSM8K | MT-Bench |", "|---|---|---|---|"]
        for n, d in r["bootstrap_vs_shipped"].items():
            out.append(f"| {n} | " + " | ".join(f"[{d[b][0]:+.3f}, {d[b][1]:+.3f}] P={d[b][2]:.2f}" for b in BENCHES) + " |")
    out += ["", "All variants (GSM8K / MT-Bench reported, not used for choice):", "",
            "| variant | MMLU CV | GSM8K | MT-Bench |", "|---|---|---|---|"]
    for n, v in V.items():
        out.append(f"| {n} | {v['mmlu_cv']:.3f} | {v['gsm8k']:.3f} | {v['mt_bench']:.3f} |")
    if "timing_batch1" in r:
        out += ["", "Extraction cost per prompt, batch 1, 2 intra-op threads, same prompts interleaved:", "",
                "| extractor | p50 ms | p90 ms |", "|---|---|---|"]
        for k, t in r["timing_batch1"].items():
            out.append(f"| {k} | {t['p50_ms']:.1f} | {t['p90_ms']:.1f} |")
    out += ["", "Batched extraction wall time: " + ", ".join(f"{k} {s:.0f} s" for k, s in r["extract_seconds"].items())]
    return "\n".join(out)


def auc(s, y):
    y = np.asarray(y) >= 0.5
    r = np.argsort(np.argsort(s)) + 1
    return float((r[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))


if __name__ == "__main__":
    main()
