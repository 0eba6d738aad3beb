#!/usr/bin/env python3
"""Trains, exports and judges a model's draft head: the small drafter the local engine runs
where prompt lookup finds nothing (`src/local/draft.rs`; the gateway's README, "The draft head").

    benches/draft_head.py MODEL_DIR [--out FILE] [--gsm8k-train 100] [--dim 1024] [--epochs 8] [--work DIR]

The heads provisioning installs were made with (then pinned in
`scripts/local_model/artifacts.toml`, `draft_head_sha256`):

    cache=${TIERGATE_CACHE:-$HOME/.cache/tiergate}
    $cache/venv-convert/bin/python benches/draft_head.py $cache/models/qwen2.5-coder-0.5b-instruct \
        --out scripts/local_model/draft_heads/qwen2.5-coder-0.5b-instruct.onnx
    $cache/venv-convert/bin/python benches/draft_head.py $cache/models/smollm2-135m-instruct \
        --pass-ms 10.4@0,13.4@1,16.8@2,22.9@4,33.2@8 --out scripts/local_model/draft_heads/smollm2-135m-instruct.onnx

Prompt lookup (`src/local/lookup.rs`) can only copy; `benches/lookup_bound.py` shows that on
the default model that is not enough. A head *predicts*, in the style of EAGLE (Li et al.,
2024): from the model's own last hidden state h_t (after the final norm) and the token
x_{t+1} that state produced, an MLP predicts the next hidden state; the model's own output
projection, restricted to the tokens the training answers use, turns it into a guess of
x_{t+2}. Verified as the engine verifies prompt-lookup drafts, a guess costs one extra row in
the next pass; the answer stays the model's greedy one.

1. Training data, apart from every prompt it is judged on: the model's greedy answers (the
   Python loop, `scripts/local_model/python_greedy.py`, <= 128 tokens) to the 186
   hand-written gateway prompts of `router-model/data/own_prompts.jsonl` and to
   `--gsm8k-train` GSM8K *training* questions (`router-model/data/gsm8k_train_questions.jsonl`,
   shuffled with seed 0). Cached in the work dir, so a second run skips this step.
2. One teacher-forced pass per prompt + answer gives h_t (the graph's `last_hidden_state`
   output, provisioning recipe 6) and the model's greedy choice at every position.
3. The head (numpy, seed 0, Adam): [h_t ; e(x_{t+1})] -> SiLU MLP -> h_t + delta, trained on
   cross-entropy over the restricted vocabulary plus a regression to the real h_{t+1}. The
   produced token is embedded with the same restricted rows (zeros for other tokens), so the
   head ships one small matrix, not the model's whole table.
4. Exported as the int8 ONNX graph the engine runs (`export`; `--out`, default
   `$WORK/draft_head.onnx`).
5. Judged on `examples/workloads/mixed.jsonl` (75 prompts, none in the training data; it
   holds the gateway prompts of `benches/local_prompts.jsonl`) with the exported graph's own
   guesses: acceptance on answer tokens, and the decode speed-up of prompt lookup alone vs
   prompt lookup with the head's guess whenever lookup has none and the head's confidence is
   at least a threshold, priced per pass with `--pass-ms` like `benches/lookup_bound.py`,
   plus the head's own cost a step (one guess timed here; `--head-ms` to set it instead).
   The engine's measured figures: `benches/local_generator.sh` (BENCHMARKS.md).

Needs the provisioned model and `$TIERGATE_CACHE/venv-convert` (run with its python).
Takes ~30 min on the 2-core reference machine for Qwen2.5-Coder-0.5B the first time, most
of it decoding the training answers; ~6 min once they are cached.
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

HIDDEN = "last_hidden_state"  # the final norm's output (scripts/local_model/gguf2onnx.py)


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
    """The model, one pass over a whole text: its final hidden states and greedy choices."""

    def __init__(self, model_dir):
        path = os.path.join(model_dir, "model.onnx")
        m = onnx.load(path, load_external_data=False)
        if HIDDEN not in [o.name for o in m.graph.output]:
            raise SystemExit(f"{path} has no `{HIDDEN}` output; provision it again (recipe 6 adds it)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.past = [(i.name, i.shape) for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.lm, self.vocab_size = lm_head(m, model_dir)

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
    return (lambda ids: (w8[:, ids].astype(np.float32) * scale[ids]).T), w8.shape[1]


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
    def __init__(self, train, lm, dim, seed=0):
        rng = np.random.default_rng(seed)
        self.vocab = np.unique(train["y"])
        self.index = {int(v): i for i, v in enumerate(self.vocab)}
        self.out = lm(self.vocab)
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
        """The produced token, embedded with the head's own output rows (one matrix to ship
        instead of the model's whole table): a token outside them reads as zeros."""
        i = np.searchsorted(self.vocab, tokens).clip(0, len(self.vocab) - 1)
        return np.where((self.vocab[i] == tokens)[:, None], self.out[i], 0.0).astype(np.float32)

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


def export(head, path, vocab_size):
    """The trained head as the int8 ONNX graph the engine runs (`src/local/draft.rs`):

        hidden     float32 [n, width]  the model's `last_hidden_state` row h_t
        token      int64   [n]         the token x_{t+1} that row produced
     -> guess      int64   [n]         the guessed x_{t+2}
        confidence float32 [n]         its probability under the head
        next_hidden float32 [n, width] the predicted h_{t+1}: fed back with `guess`, it
                                       guesses x_{t+3} (the engine chains two guesses)

    Weights are int8 with a scale per output column (`DynamicQuantizeMatMul`: activations
    quantized per call, as the model's own int8 layers are). One [width, R + 1] matrix serves
    both as the output rows and as the table the produced token is embedded with (column R:
    zeros, for tokens outside the head's R; masked out of the guesses by its bias)."""
    from onnx import numpy_helper
    width = head.w2.shape[1]
    r = len(head.vocab)

    def q8(w):  # symmetric, per column
        scale = np.abs(w).max(0) / 127.0
        scale[scale == 0] = 1.0
        return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)
    out8, out_s = q8(np.concatenate([head.out.T, np.zeros((width, 1), np.float32)], 1))
    w1_8, w1_s = q8(head.w1)
    w2_8, w2_s = q8(head.w2)
    row_of = np.full(vocab_size, r, np.int32)
    row_of[head.vocab] = np.arange(r, dtype=np.int32)
    out_bias = np.zeros(r + 1, np.float32)
    out_bias[r] = -1e9
    arrays = {"row_of": row_of, "vocab": head.vocab.astype(np.int64), "mu_h": head.mu_h, "inv_sd_h": 1 / head.sd_h,
              "mu_e": head.mu_e, "inv_sd_e": 1 / head.sd_e, "out8": out8, "out_s": out_s, "out_bias": out_bias,
              "w1_8": w1_8, "w1_s": w1_s, "b1": head.b1, "w2_8": w2_8, "w2_s": w2_s, "b2": head.b2}
    inits = [numpy_helper.from_array(np.ascontiguousarray(v if v.dtype != np.float64 else v.astype(np.float32)), k)
             for k, v in arrays.items()]
    node = helper.make_node

    def dq_matmul(x, w, out):
        return node("DynamicQuantizeMatMul", [x, f"{w}_8", f"{w}_s", "", ""], [out], domain="com.microsoft")
    nodes = [
        # e(x_{t+1}): its column of out8, dequantized; zeros outside the head's tokens.
        node("Gather", ["row_of", "token"], ["row"]),
        node("Gather", ["out8", "row"], ["e8_t"], axis=1), node("Transpose", ["e8_t"], ["e8"], perm=[1, 0]),
        node("Cast", ["e8"], ["e_raw"], to=TensorProto.FLOAT), node("Gather", ["out_s", "row"], ["e_s0"]),
        node("Unsqueeze", ["e_s0", "one"], ["e_s"]), node("Mul", ["e_raw", "e_s"], ["e"]),
        node("Sub", ["hidden", "mu_h"], ["hc"]), node("Mul", ["hc", "inv_sd_h"], ["hz"]),
        node("Sub", ["e", "mu_e"], ["ec"]), node("Mul", ["ec", "inv_sd_e"], ["ez"]),
        node("Concat", ["hz", "ez"], ["z"], axis=1),
        dq_matmul("z", "w1", "a0"), node("Add", ["a0", "b1"], ["a"]),
        node("Sigmoid", ["a"], ["s"]), node("Mul", ["a", "s"], ["act"]),
        dq_matmul("act", "w2", "d0"), node("Add", ["d0", "b2"], ["d"]),
        node("Add", ["hidden", "d"], ["next_hidden"]),
        node("DynamicQuantizeMatMul", ["next_hidden", "out8", "out_s", "", "out_bias"], ["lg"], domain="com.microsoft"),
        node("Softmax", ["lg"], ["p"], axis=1), node("ReduceMax", ["p", "one"], ["confidence"], keepdims=0),
        node("ArgMax", ["lg"], ["i"], axis=1, keepdims=0), node("Gather", ["vocab", "i"], ["guess"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    g = helper.make_graph(nodes, "draft_head",
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", width]),
                           helper.make_tensor_value_info("token", TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("guess", TensorProto.INT64, ["n"]),
                           helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["n"]),
                           helper.make_tensor_value_info("next_hidden", TensorProto.FLOAT, ["n", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    onnx.save(m, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def guess_int8(sess, h, x):
    """The exported graph's guesses, confidences and predicted next hidden states."""
    out = ([], [], [])
    for i in range(0, len(h), 1024):
        r = sess.run(["guess", "confidence", "next_hidden"],
                     {"hidden": h[i:i + 1024].astype(np.float32), "token": x[i:i + 1024].astype(np.int64)})
        for o, v in zip(out, r):
            o.append(v)
    return tuple(np.concatenate(o) for o in out)


def step_ms(sess, h, x):
    """Median ms of one decode step's guess (one row), with the CPU caches flushed before each
    as the model's ~0.5 GB of weights flush them in the engine."""
    feeds, flush, times = {"hidden": h[:1], "token": x[:1].astype(np.int64)}, np.ones(50_000_000, np.float32), []
    for _ in range(60):
        flush += 1.0
        t = time.perf_counter()
        sess.run(["guess", "confidence"], feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times[10:]) * 1000)


class HeadGuess(lookup_bound.PromptLookup):
    """The engine's drafting (`src/local/engine.rs`): prompt lookup, and when it has no draft,
    the head's guesses, chained up to `chain` deep while each is confident enough. `guesses`
    maps the position of the row that produced the last token to [(token, confidence), ...]:
    the guess after it, then the guess after that one (from the predicted hidden state).
    Guesses do not feed lookup's draft-length bookkeeping. `calls` counts head runs."""

    def __init__(self, guesses, threshold, chain):
        super().__init__(8)
        self.guesses, self.threshold, self.chain, self.guessed, self.calls = guesses, threshold, chain, False, 0

    def draft(self, history, room):
        found = super().draft(history, room)
        self.guessed = False
        if found or room <= 0 or len(history) - 2 not in self.guesses:
            return found
        out = []
        for tok, conf in self.guesses[len(history) - 2][:min(self.chain, room)]:
            self.calls += 1
            if conf < self.threshold:
                break
            out.append(tok)
        self.guessed = bool(out)
        return out

    def record(self, drafted, accepted):
        if not self.guessed:
            super().record(drafted, accepted)


def speedup(run, guesses, pass_ms, head_ms, threshold, chain):
    """Decode speed-up of a known greedy answer over one-token passes: prompt lookup alone
    (`guesses` None), or with the head's guesses, every run of the head charged `head_ms`."""
    drafter = lookup_bound.PromptLookup(8) if guesses is None else HeadGuess(guesses, threshold, chain)
    ratio, _ = lookup_bound.replay(run["prompt"], run["answer"], drafter, pass_ms, 128)
    steps = len(run["answer"]) - 1
    spent = steps * pass_ms(0) / ratio + head_ms * getattr(drafter, "calls", 0)
    return steps * pass_ms(0) / spent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--gsm8k-train", type=int, default=100, help="GSM8K training questions added to the training prompts")
    ap.add_argument("--dim", type=int, default=1024, help="the MLP's hidden width")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--pass-ms", default="38.9@0,47.1@1,50.4@2,56.8@4,66.0@8",
                    help="ms of a pass over 1 + k tokens (default: Qwen2.5-Coder-0.5B, BENCHMARKS.md)")
    ap.add_argument("--head-ms", type=float, help="ms the head adds to every step (default: measured here)")
    ap.add_argument("--thresholds", default="0.3,0.5,0.7",
                    help="least confidence of a guess that is drafted (the engine: 0.5)")
    ap.add_argument("--chain", type=int, default=2, help="most guesses drafted a step (the engine: 2)")
    ap.add_argument("--out", help="where to write the head (default: $WORK/draft_head.onnx); the heads "
                                  "provisioning installs are scripts/local_model/draft_heads/MODEL_DIR_NAME.onnx")
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
    head = Head(train, forced.lm, a.dim)
    head.fit(train, a.epochs)
    sess = export(head, a.out or os.path.join(work, "draft_head.onnx"), forced.vocab_size)
    guess, conf, pred = guess_int8(sess, test["h"], test["x"])
    # The chained guess: the head again, on its own predicted hidden state and its guess.
    guess2, conf2, _ = guess_int8(sess, pred, guess)
    head_ms = a.head_ms if a.head_ms is not None else step_ms(sess, test["h"], test["x"])
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
    # The chained guess's truth: the next position's greedy token, when the first guess was right.
    nxt = np.r_[(test["seq"][1:] == test["seq"][:-1]) & (test["pos"][1:] == test["pos"][:-1] + 1), False]
    both = on_answers & right & nxt
    truth2 = np.r_[test["y"][1:], -1]
    print(f"\nchained guess (from the predicted hidden state) right when the first was: "
          f"{(guess2 == truth2)[both].mean():.3f} of {int(both.sum())}")
    pass_ms = lookup_bound.cost_model(a.pass_ms)
    by_seq = {}
    for s, p, g, c in zip(test["seq"], test["pos"], guess, conf):
        by_seq.setdefault(int(s), {})[int(p)] = [(int(g), float(c))]
    for s, p, g, c in zip(test["seq"], test["pos"], guess2, conf2):
        by_seq[int(s)][int(p)].append((int(g), float(c)))
    print()
    print("| prompt | tokens | lookup | " + " | ".join(f"+ head x{a.chain}, conf >= {t}" for t in thresholds) + " |")
    print("|---|---:|---:|" + "---:|" * len(thresholds))
    med = {"all": {}, "bench": {}}
    for s, ((name, _), run) in enumerate(zip(eval_named, eval_runs)):
        if len(run["answer"]) < 16:
            continue
        row = [speedup(run, None, pass_ms, 0.0, 0.0, 0)]
        row += [speedup(run, by_seq.get(s, {}), pass_ms, head_ms, t, a.chain) for t in thresholds]
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
