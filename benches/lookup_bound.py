#!/usr/bin/env python3
"""How fast prompt-lookup speculation can make greedy decoding on given prompts, at best.

    benches/lookup_bound.py MODEL_DIR [--prompts FILE] [--pass-ms MS@K,...]

Decodes every prompt greedily with the Python loop (`scripts/local_model/python_greedy.py`),
then replays the engine's drafting policy (`src/local/lookup.rs`, mirrored below: the same
n-gram matching, draft lengths and pauses, so its drafted/accepted counts equal the engine's
in `benches/local_generator.sh`) over the known answer, and prices each forward pass with a
cost per pass over 1 + k tokens (`--pass-ms`, measured by the engine's `--profile`; the
default is Qwen2.5-Coder-0.5B's row in BENCHMARKS.md). Prints, per prompt, the decode speed-up
over one-token passes:

- `shipped`: the engine's policy at those pass costs (what the paired bench measures, before
  the engine's own ~2 % difference to Python);
- `free rows`: the same drafts if the extra rows of a pass cost nothing;
- `bound`: rows free, and at every step the best span any copying drafter could propose
  (`CopyOracle`, which knows the answer): no drafter that copies from the context gets more.

With `--memory`, one more column prices a drafter the engine does not have (an experiment, see
BENCHMARKS.md "An answer memory"): when the context offers no match, it drafts from an n-gram
table of the model's greedy answers to the *other* prompts of the file (leave-one-out), the way
a gateway could remember the answers it served before. Prompts that are also in
`benches/local_prompts.jsonl` are listed under their names there.

Needs the provisioned model and `$TIERGATE_CACHE/venv-convert` (run with its python, as
`benches/local_generator.sh` does).
"""
import argparse
import collections
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts", "local_model"))
import python_greedy  # noqa: E402

# src/local/lookup.rs
MAX_NGRAM, MIN_NGRAM, MISSES_BEFORE_PAUSE, MAX_PAUSE = 3, 2, 2, 32


class PromptLookup:
    def __init__(self, max_draft, pauses=True):
        self.max_draft, self.next_len = max_draft, min(max_draft, 4)
        self.misses = self.pause = self.paused_for = 0
        self.pauses = pauses
        self.drafted = self.accepted = 0

    def draft(self, history, room):
        want = min(self.next_len, room)
        if want == 0:
            return []
        if self.paused_for > 0:
            self.paused_for -= 1
            return []
        n = len(history)
        for size in range(min(MAX_NGRAM, n - 1), MIN_NGRAM - 1, -1):
            tail = history[n - size:]
            for i in range(n - size - 1, -1, -1):
                if history[i:i + size] == tail:
                    return history[i + size:min(i + size + want, n)]
        return []

    def record(self, drafted, accepted):
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.next_len = min(self.next_len + 2, self.max_draft)
        else:
            self.next_len = max(1, min(accepted + 1, self.max_draft))
        if not self.pauses:
            return
        if accepted == 0:
            self.misses += 1
            if self.misses >= MISSES_BEFORE_PAUSE:
                self.pause = min(max(self.pause * 2, 2), MAX_PAUSE)
                self.paused_for = self.pause
                self.misses = 0
        else:
            self.misses = self.pause = 0


class AnswerMemory(PromptLookup):
    """The shipped policy, and when the context has no match, a draft chained from the most
    frequent continuation (seen at least MEMORY_MIN_COUNT times, at least half of the time) of
    the longest 3..1-token tail found in `table` (other answers' n-grams)."""

    def __init__(self, max_draft, table):
        super().__init__(max_draft)
        self.table = table

    def draft(self, history, room):
        paused = self.paused_for > 0
        found = super().draft(history, room)
        want = min(self.next_len, room)
        if found or paused or want == 0:
            return found
        out, tail = [], list(history[-MAX_NGRAM:])
        while len(out) < want:
            nxt = None
            for size in range(min(MAX_NGRAM, len(tail)), 0, -1):
                seen = self.table.get(tuple(tail[-size:]))
                if seen:
                    tok, n = seen.most_common(1)[0]
                    if n >= MEMORY_MIN_COUNT and 2 * n >= sum(seen.values()):
                        nxt = tok
                    break
            if nxt is None:
                break
            out.append(nxt)
            tail = (tail + [nxt])[-MAX_NGRAM:]
        return out


MEMORY_MIN_COUNT = 2


def memory_table(answers):
    table = collections.defaultdict(collections.Counter)
    for seq in answers:
        for i in range(1, len(seq)):
            for size in range(1, min(MAX_NGRAM, i) + 1):
                table[tuple(seq[i - size:i])][seq[i]] += 1
    return table


class CopyOracle:
    """Knows the answer: at every step drafts the longest run of the coming answer tokens that
    occurs anywhere in the context (the prompt or the answer so far). No drafter that copies
    spans from the context guesses more."""

    def __init__(self):
        self.drafted = self.accepted = 0

    def draft(self, history, room, truth):
        best = 0, 0
        for i in range(len(history)):
            n = 0
            while n < room and i + n < len(history) and n < len(truth) and history[i + n] == truth[n]:
                n += 1
            if n > best[1]:
                best = i, n
        return history[best[0]:best[0] + best[1]]

    def record(self, drafted, accepted):
        self.drafted += drafted
        self.accepted += accepted


def replay(prompt, answer, lookup, pass_ms, max_tokens):
    """Decode time of `answer` (known greedy tokens) with drafts from `lookup`, relative to
    one token per pass: (speed-up, passes)."""
    out, spent, passes = [answer[0]], 0.0, 0
    while len(out) < len(answer):
        truth = answer[len(out):]
        room = max(0, max_tokens - len(out) - 1)
        draft = (lookup.draft(prompt + out, room, truth) if isinstance(lookup, CopyOracle)
                 else lookup.draft(prompt + out, room))
        ok = 0
        while ok < len(draft) and ok < len(truth) - 1 and draft[ok] == truth[ok]:
            ok += 1
        lookup.record(len(draft), ok)
        spent += pass_ms(len(draft))
        passes += 1
        out += truth[:ok + 1]
    return (len(answer) - 1) * pass_ms(0) / spent, passes


def cost_model(spec):
    """'40.4@0,45.4@1,...' -> k -> ms, linear between the given k and beyond the last."""
    pts = sorted((int(k), float(ms)) for ms, k in (p.split("@") for p in spec.split(",")))

    def ms(k):
        for (k0, m0), (k1, m1) in zip(pts, pts[1:]):
            if k <= k1:
                return m0 + (m1 - m0) * (k - k0) / (k1 - k0)
        (k0, m0), (k1, m1) = pts[-2], pts[-1]
        return m1 + (m1 - m0) * (k - k1) / (k1 - k0)
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", default=os.path.join(HERE, "local_prompts.jsonl"))
    ap.add_argument("--pass-ms", default="40.4@0,45.4@1,50.4@2,60.1@4,77.9@8",
                    help="ms of a pass over 1 + k tokens (default: Qwen2.5-Coder-0.5B, BENCHMARKS.md)")
    ap.add_argument("--draft", type=int, default=8, help="the engine's draft_tokens")
    ap.add_argument("--min-tokens", type=int, default=16, help="shorter answers are listed, not counted")
    ap.add_argument("--memory", action="store_true",
                    help="add a column: drafts also from the other prompts' answers (leave-one-out)")
    a = ap.parse_args()
    pass_ms = cost_model(a.pass_ms)
    free = lambda k: pass_ms(0)  # noqa: E731
    model = python_greedy.Model(a.model_dir, spin=False)
    bench_names = {}
    for line in open(os.path.join(HERE, "local_prompts.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        bench_names[json.dumps(r["messages"], sort_keys=True)] = r["name"]
    runs = []
    for i, line in enumerate(open(a.prompts, encoding="utf-8")):
        r = json.loads(line)
        name = r.get("name") or bench_names.get(json.dumps(r["messages"], sort_keys=True)) or f"#{i + 1}"
        _, ids = model.messages_ids(r["messages"])
        max_tokens = r.get("max_tokens", 128)
        answer, _, _ = model.generate(ids, max_tokens, ignore_eos=r.get("ignore_eos", False))
        runs.append((name, ids, answer, max_tokens))
        print(f"decoded {name}: {len(answer)} tokens", file=sys.stderr, flush=True)
    cols = ["shipped", "free rows", "bound"] + (["memory"] if a.memory else [])
    print("| prompt | tokens | drafted | accepted | " + " | ".join(cols) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(cols))
    counted = {c: [] for c in cols}
    named = {c: [] for c in cols}
    for j, (name, ids, answer, max_tokens) in enumerate(runs):
        if len(answer) < 2:
            continue
        shipped = PromptLookup(a.draft)
        got = {"shipped": replay(ids, answer, shipped, pass_ms, max_tokens)[0],
               "free rows": replay(ids, answer, PromptLookup(a.draft), free, max_tokens)[0],
               "bound": replay(ids, answer, CopyOracle(), free, max_tokens)[0]}
        if a.memory:
            table = memory_table(other[2] for k, other in enumerate(runs) if k != j)
            got["memory"] = replay(ids, answer, AnswerMemory(a.draft, table), pass_ms, max_tokens)[0]
        note = "" if len(answer) >= a.min_tokens else " (too short, not counted)"
        print(f"| {name}{note} | {len(answer)} | {shipped.drafted} | {shipped.accepted} | "
              + " | ".join(f"{got[c]:.2f}" for c in cols) + " |", flush=True)
        if not note and name != "generic":
            for c in cols:
                counted[c].append(got[c])
                if not name.startswith("#"):
                    named[c].append(got[c])
    for label, vals in (("gateway prompts", counted), ("of them in local_prompts.jsonl", named)):
        if vals["shipped"] and (label == "gateway prompts" or len(vals["shipped"]) < len(counted["shipped"])):
            print(f"| median, {label} ({len(vals['shipped'])}) | | | | "
                  + " | ".join(f"{statistics.median(vals[c]):.2f}" for c in cols) + " |")

if __name__ == "__main__":
    main()
