#!/usr/bin/env python3
"""Would a trained draft head get the local tier's default model past "decode >= 1.2x"?

    benches/draft_head.py MODEL_DIR [--gsm8k-train 100] [--dim 1024] [--epochs 8] [--work DIR]

An experiment, not part of the engine (BENCHMARKS.md, "A trained draft head"). Prompt
lookup (`src/local/lookup.rs`) can only copy; `benches/lookup_bound.py` shows that on the
default model that is not enough. This script measures what a small drafter that *predicts*
would add, in the style of EAGLE (Li et al., 2024): from the model's own last hidden state
h_t (after the final norm) and the token x_{t+1} that state produced, an MLP predicts the
next hidden state; the model's own output projection, restricted to the tokens the training
answers use, turns it into a guess of x_{t+2}. Verified as the engine verifies prompt-lookup
drafts, a guess costs one extra row in the next pass; the answer stays the model's greedy one.

1. Training data, apart from every prompt it is judged on: the model's greedy answers (the
   Python loop, `scripts/local_model/python_greedy.py`, <= 128 tokens) to the 186
   hand-written gateway prompts of `router-model/data/own_prompts.jsonl` and to
   `--gsm8k-train` GSM8K *training* questions (`router-model/data/gsm8k_train_questions.jsonl`,
   shuffled with seed 0). Cached in the work dir, so a second run skips this step.
2. One teacher-forced pass per prompt + answer gives h_t and the model's greedy choice at
   every position (the graph is loaded with the final norm's output added; the model file
   is not changed).
3. The head (numpy, seed 0, Adam): [h_t ; e(x_{t+1})] -> SiLU MLP -> h_t + delta, trained on
   cross-entropy over the restricted vocabulary plus a regression to the real h_{t+1}.
4. Judged on `examples/workloads/mixed.jsonl` (75 prompts, none in the training data; it
   holds the gateway prompts of `benches/local_prompts.jsonl`): acceptance of its guesses on
   answer tokens, and the decode speed-up of prompt lookup alone vs prompt lookup with the
   head's guess whenever lookup has none and the head's confidence is at least a threshold,
   priced per pass with `--pass-ms` like `benches/lookup_bound.py`, plus the head's own cost
   a step: the trained head is exported as an int8 ONNX graph (`$WORK/draft_head.onnx`), its
   guesses are the ones judged, and one guess is timed here (`--head-ms` to set it instead).

Needs the provisioned model and `$TIERGATE_CACHE/venv-convert` (run with its python).
Takes ~30 min on the 2-core reference machine for Qwen2.5-Coder-0.5B, most of it decoding
the training answers.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts", "local_model"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import lookup_bound  # noqa: E402
import python_greedy  # noqa: E402
from provision import cache_dir  # noqa: E402

HIDDEN = "/model/norm/Mul_out0"  # the final norm's output in graphs from gguf2onnx.py


def training_requests(n_gsm8k):
    reqs = []
    for line in open(os.path.join(ROOT, "router-model", "data", "own_prompts.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        reqs.append((r["id"], r.get("messages") or [{"role": "user", "content": r["prompt"]}]))
    qs = [json.loads(line) for line in open(os.path.join(ROOT, "router-model", "data",
                                                           "gsm8k_train_questions.jsonl"), encoding="utf-8")]
    random.Random(0).shuffle(qs)
    reqs += [(f"gsm8k-train-{i}", [{"role": "user", "content": q["question"]}]) for i, q in enumerate(qs[:n_gsm8k])]
    return reqs


def eval_requests():
    names = {}
    for line in open(os.path.join(HERE, "local_prompts.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        names[json.dumps(r["messages"], sort_keys=True)] = r["name"]
    out = []
    for i, line in enumerate(open(os.path.join(ROOT, "examples", "workloads", "mixed.jsonl"), encoding="utf-8")):
        msgs = json.loads(line)["messages"]
        out.append((names.get(json.dumps(msgs, sort_keys=True), f"#{i + 1}"), msgs))
    return out


def answers(model, reqs, path, label):
    """Greedy answers (<= 128 tokens), cached in `path` one JSON line per request."""
    done = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            done[r["name"]] = r
    with open(path, "a", encoding="utf-8") as f:
        for k, (name, msgs) in enumerate(reqs):
            if name in done:
                continue
            _, ids = model.messages_ids(msgs)
            ans, _, _ = model.generate(ids, 128)
            done[name] = {"name": name, "prompt": ids, "answer": ans}
            f.write(json.dumps(done[name]) + "\n")
            f.flush()
            print(f"{label}: decoded {k + 1}/{len(reqs)} {name} ({len(ans)} tokens)", file=sys.stderr, flush=True)
    return [done[name] for name, _ in reqs]


class Forced:
    """The model with its final hidden state as an extra output; one pass over a whole text."""

    def __init__(self, model_dir):
        m = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
        self.width = json.load(open(os.path.join(model_dir, "config.json")))["hidden_size"]
        m.graph.output.append(helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, ["b", "s", self.width]))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", model_dir)
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.past = [(i.name, i.shape) for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.lm = lm_head(m, model_dir)

    def run(self, ids):
        n = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        for name, shape in self.past:
            feeds[name] = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        logits, hidden = self.sess.run(["logits", HIDDEN], feeds)
        return hidden[0], logits[0].argmax(-1)


def lm_head(m, model_dir):
    """token ids -> rows of the output projection (int8 weights x per-column scale)."""
    init = {i.name: i for i in m.graph.initializer}

    def read(name, dtype):
        t = init[name]
        info = {e.key: e.value for e in t.external_data}
        with open(os.path.join(model_dir, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info["length"]))
        return np.frombuffer(raw, dtype).reshape(tuple(t.dims))
    w8, scale = read("lm_head.weight/int8", np.int8), read("lm_head.weight/scale", np.float32)
    return lambda ids: (w8[:, ids].astype(np.float32) * scale[ids]).T


def features(forced, runs):
    """Per position t with a next token: h_t, x_{t+1}, the model's greedy x_{t+2}, h_{t+1}, and
    (sequence, position, whether x_{t+1} and x_{t+2} are answer tokens)."""
    cols = {k: [] for k in ("h", "x", "y", "h_next", "seq", "pos", "answer")}
    same = total = 0
    for s, r in enumerate(runs):
        ids = (r["prompt"] + r["answer"])[:1024]
        h, greedy = forced.run(ids)
        # One pass over the whole text must choose what decoding chose, token by token.
        decoded = np.arange(len(r["prompt"]) - 1, len(ids) - 1)
        same += int((greedy[decoded] == np.array(ids)[decoded + 1]).sum())
        total += len(decoded)
        t = np.arange(len(ids) - 1)
        cols["h"].append(h[t])
        cols["x"].append(np.array(ids)[t + 1])
        cols["y"].append(greedy[t + 1])
        cols["h_next"].append(h[t + 1])
        cols["seq"].append(np.full(len(t), s))
        cols["pos"].append(t)
        cols["answer"].append(t >= len(r["prompt"]))
    print(f"teacher-forced greedy choice = decoded token at {same} of {total} answer positions",
          file=sys.stderr, flush=True)
    return {k: np.concatenate(v) for k, v in cols.items()}, same / max(total, 1)


class Head:
    def __init__(self, train, lm, dim, shared=False, seed=0):
        rng = np.random.default_rng(seed)
        self.shared = shared
        self.vocab = np.unique(train["y"])
        self.index = {int(v): i for i, v in enumerate(self.vocab)}
        self.out = lm(self.vocab)
        self.lm = lm
        e = self.embed(train["x"])
        self.mu_h, self.sd_h = train["h"].mean(0), train["h"].std(0) + 1e-4
        self.mu_e, self.sd_e = e.mean(0), e.std(0) + 1e-4
        width = train["h"].shape[1]
        self.w1 = (rng.standard_normal((2 * width, dim)) / np.sqrt(2 * width)).astype(np.float32)
        self.b1 = np.zeros(dim, np.float32)
        self.w2 = np.zeros((dim, width), np.float32)
        self.b2 = np.zeros(width, np.float32)
        self.rng = rng

    def embed(self, tokens):
        if self.shared:
            # Only the rows the head guesses from: a token outside them reads as zeros.
            i = np.searchsorted(self.vocab, tokens).clip(0, len(self.vocab) - 1)
            return np.where((self.vocab[i] == tokens)[:, None], self.out[i], 0.0).astype(np.float32)
        u, inv = np.unique(tokens, return_inverse=True)
        return self.lm(u)[inv]

    def inputs(self, h, x):
        return np.concatenate([(h - self.mu_h) / self.sd_h, (self.embed(x) - self.mu_e) / self.sd_e], 1).astype(np.float32)

    def forward(self, z, h):
        a = z @ self.w1 + self.b1
        s = 1 / (1 + np.exp(-a))
        return a, s, a * s, h + (a * s) @ self.w2 + self.b2

    def fit(self, train, epochs, lr=1e-3, batch=256, reg=1.0):
        z_all, h_all, hn_all = self.inputs(train["h"], train["x"]), train["h"], train["h_next"]
        y_all = np.array([self.index.get(int(v), -1) for v in train["y"]])
        params = [self.w1, self.b1, self.w2, self.b2]
        m1 = [np.zeros_like(p) for p in params]
        m2 = [np.zeros_like(p) for p in params]
        scale2 = float((hn_all ** 2).mean())
        step = 0
        for ep in range(epochs):
            t0, loss, order = time.time(), 0.0, self.rng.permutation(len(z_all))
            for i in range(0, len(order), batch):
                j = order[i:i + batch]
                z, h, y, hn = z_all[j], h_all[j], y_all[j], hn_all[j]
                a, s, act, pred = self.forward(z, h)
                lg = pred @ self.out.T
                lg -= lg.max(1, keepdims=True)
                p = np.exp(lg)
                p /= p.sum(1, keepdims=True)
                rows = np.nonzero(y >= 0)[0]
                loss -= np.log(p[rows, y[rows]] + 1e-9).sum()
                g = p
                g[rows, y[rows]] -= 1
                g[y < 0] = 0
                dpred = (g @ self.out + reg * 2 * (pred - hn) / scale2) / len(j)
                da = (dpred @ self.w2.T) * (s * (1 + a * (1 - s)))
                grads = [z.T @ da + 1e-4 * self.w1, da.sum(0), act.T @ dpred + 1e-4 * self.w2, dpred.sum(0)]
                step += 1
                for k, (p_, g_) in enumerate(zip(params, grads)):
                    m1[k] = 0.9 * m1[k] + 0.1 * g_
                    m2[k] = 0.999 * m2[k] + 0.001 * g_ * g_
                    p_ -= lr * (m1[k] / (1 - 0.9 ** step)) / (np.sqrt(m2[k] / (1 - 0.999 ** step)) + 1e-8)
            print(f"epoch {ep + 1}/{epochs}: loss {loss / len(order):.3f} ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    def guess(self, h, x):
        out, conf = [], []
        for i in range(0, len(h), 1024):
            *_, pred = self.forward(self.inputs(h[i:i + 1024], x[i:i + 1024]), h[i:i + 1024])
            lg = pred @ self.out.T
            p = np.exp(lg - lg.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out.append(self.vocab[lg.argmax(1)])
            conf.append(p.max(1))
        return np.concatenate(out), np.concatenate(conf)


def export(head, path):
    """The trained head as an int8 ONNX graph (weights quantized as the model's are, by
    onnxruntime's dynamic quantization): [h ; e] normalized, h -> guessed token, confidence."""
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    width = head.w2.shape[1]
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), n) for n, v in
             [("w1", head.w1), ("b1", head.b1), ("w2", head.w2), ("b2", head.b2), ("out", head.out.T)]]
    inits.append(numpy_helper.from_array(head.vocab.astype(np.int64), "vocab"))
    node = helper.make_node
    nodes = [node("MatMul", ["z", "w1"], ["a0"]), node("Add", ["a0", "b1"], ["a"]),
             node("Sigmoid", ["a"], ["s"]), node("Mul", ["a", "s"], ["act"]),
             node("MatMul", ["act", "w2"], ["d0"]), node("Add", ["d0", "b2"], ["d"]),
             node("Add", ["h", "d"], ["pred"]), node("MatMul", ["pred", "out"], ["lg"]),
             node("Softmax", ["lg"], ["p"], axis=1), node("ReduceMax", ["p"], ["conf"], axes=[1], keepdims=0),
             node("ArgMax", ["lg"], ["i"], axis=1, keepdims=0), node("Gather", ["vocab", "i"], ["token"])]
    g = helper.make_graph(nodes, "draft_head",
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2 * width]),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info("token", TensorProto.INT64, ["n"]),
                           helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["n"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path + ".f32.onnx")
    quantize_dynamic(path + ".f32.onnx", path, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def guess_int8(head, sess, h, x):
    tokens, confs = [], []
    for i in range(0, len(h), 1024):
        t, c = sess.run(["token", "conf"], {"z": head.inputs(h[i:i + 1024], x[i:i + 1024]), "h": h[i:i + 1024]})
        tokens.append(t)
        confs.append(c)
    return np.concatenate(tokens), np.concatenate(confs)


def step_ms(head, sess, h, x):
    """Median ms of one decode step's guess (one row), with the CPU caches flushed before each
    as the model's ~0.5 GB of weights flush them in the engine."""
    z, flush, times = head.inputs(h[:1], x[:1]), np.ones(50_000_000, np.float32), []
    for _ in range(60):
        flush += 1.0
        t = time.perf_counter()
        sess.run(["token", "conf"], {"z": z, "h": h[:1]})
        times.append(time.perf_counter() - t)
    return float(np.median(times[10:]) * 1000)


class HeadGuess(lookup_bound.PromptLookup):
    """Prompt lookup, and when it has no draft, the head's guess (if confident enough) for the
    token after the last one: `guesses` maps the position of the row that produced that last
    token to (token, confidence). A guess does not feed lookup's draft-length bookkeeping."""

    def __init__(self, guesses, threshold):
        super().__init__(8)
        self.guesses, self.threshold, self.guessed = guesses, threshold, False

    def draft(self, history, room):
        found = super().draft(history, room)
        tok, conf = self.guesses.get(len(history) - 2, (None, 0.0))
        self.guessed = not found and room > 0 and tok is not None and conf >= self.threshold
        return [tok] if self.guessed else found

    def record(self, drafted, accepted):
        if not self.guessed:
            super().record(drafted, accepted)


def speedup(run, guesses, pass_ms, head_ms, threshold):
    """Decode speed-up of a known greedy answer over one-token passes: prompt lookup alone
    (`guesses` None), or with the head's guesses, every step charged `head_ms` more."""
    if guesses is None:
        drafter, cost = lookup_bound.PromptLookup(8), pass_ms
    else:
        drafter, cost = HeadGuess(guesses, threshold), (lambda k: pass_ms(k) + head_ms)
    # Speed-ups are against one-token passes without the head.
    ratio, _ = lookup_bound.replay(run["prompt"], run["answer"], drafter, cost, 128)
    return ratio * pass_ms(0) / cost(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--gsm8k-train", type=int, default=100, help="GSM8K training questions added to the training prompts")
    ap.add_argument("--dim", type=int, default=1024, help="the MLP's hidden width")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--pass-ms", default="40.4@0,45.4@1,50.4@2,60.1@4,77.9@8",
                    help="ms of a pass over 1 + k tokens (default: Qwen2.5-Coder-0.5B, BENCHMARKS.md)")
    ap.add_argument("--head-ms", type=float, help="ms the head adds to every step (default: measured here)")
    ap.add_argument("--thresholds", default="0,0.3,0.5,0.7")
    ap.add_argument("--shared-rows", action="store_true",
                    help="embed the produced token with the head's own output rows only (zeros for "
                         "other tokens) instead of the model's whole table: what an engine would ship")
    ap.add_argument("--work", help="where answers are cached (default: $TIERGATE_CACHE/draft-head/MODEL)")
    a = ap.parse_args()
    work = a.work or os.path.join(str(cache_dir()), "draft-head", os.path.basename(os.path.normpath(a.model_dir)))
    os.makedirs(work, exist_ok=True)
    model = python_greedy.Model(a.model_dir, spin=False)
    train_runs = answers(model, training_requests(a.gsm8k_train), os.path.join(work, "train_answers.jsonl"), "train")
    eval_named = eval_requests()
    eval_runs = answers(model, eval_named, os.path.join(work, "eval_answers.jsonl"), "eval")
    del model
    forced = Forced(a.model_dir)
    train, _ = features(forced, train_runs)
    test, agree = features(forced, eval_runs)
    print(f"training positions {len(train['h'])} ({int(train['answer'].sum())} in answers); "
          f"vocabulary of guesses {len(np.unique(train['y']))}", file=sys.stderr, flush=True)
    head = Head(train, forced.lm, a.dim, shared=a.shared_rows)
    head.fit(train, a.epochs)
    sess = export(head, os.path.join(work, "draft_head.onnx"))
    guess, conf = guess_int8(head, sess, test["h"], test["x"])
    head_ms = a.head_ms if a.head_ms is not None else step_ms(head, sess, test["h"], test["x"])
    right = guess == test["y"]
    on_answers = test["answer"]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    print(f"training prompts: {len(train_runs)} ({int(train['answer'].sum())} answer tokens); "
          f"judged on examples/workloads/mixed.jsonl: {len(eval_runs)} prompts, {int(on_answers.sum())} answer tokens; "
          f"guesses from the int8 head ({len(head.vocab)} tokens), {head_ms:.2f} ms a step; "
          f"one pass over prompt + answer chooses the decoded token at {agree:.1%} of answer positions")
    print()
    print("| confidence at least | share of answer tokens guessed | right |")
    print("|---:|---:|---:|")
    for t in thresholds:
        sel = on_answers & (conf >= t)
        print(f"| {t} | {sel.sum() / on_answers.sum():.2f} | {right[sel].mean() if sel.any() else 0:.3f} |")
    pass_ms = lookup_bound.cost_model(a.pass_ms)
    by_seq = {}
    for s, p, g, c in zip(test["seq"], test["pos"], guess, conf):
        by_seq.setdefault(int(s), {})[int(p)] = (int(g), float(c))
    print()
    print("| prompt | tokens | lookup | " + " | ".join(f"+ head, conf >= {t}" for t in thresholds) + " |")
    print("|---|---:|---:|" + "---:|" * len(thresholds))
    med = {"all": {}, "bench": {}}
    for s, ((name, _), run) in enumerate(zip(eval_named, eval_runs)):
        if len(run["answer"]) < 16:
            continue
        row = [speedup(run, None, pass_ms, 0.0, 0.0)]
        row += [speedup(run, by_seq.get(s, {}), pass_ms, head_ms, t) for t in thresholds]
        print(f"| {name} | {len(run['answer'])} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
        for group in ("all", "bench") if not name.startswith("#") else ("all",):
            for k, v in enumerate(row):
                med[group].setdefault(k, []).append(v)
    for group, label in (("all", "all prompts"), ("bench", "the gateway prompts of benches/local_prompts.jsonl")):
        if med[group]:
            n = len(med[group][0])
            print(f"| median, {label} ({n}) | | " + " | ".join(
                f"{statistics.median(med[group][k]):.2f}" for k in sorted(med[group])) + " |")


if __name__ == "__main__":
    main()
