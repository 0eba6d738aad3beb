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

Needs the provisioned model and `$TIERGATE_CACHE/venv-convert` (run with its python, as
`benches/local_generator.sh` does).
"""
import argparse
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
    a = ap.parse_args()
    pass_ms = cost_model(a.pass_ms)
    free = lambda k: pass_ms(0)  # noqa: E731
    model = python_greedy.Model(a.model_dir, spin=False)
    print("| prompt | tokens | drafted | accepted | shipped | free rows | bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    counted = {"shipped": [], "free": [], "bound": []}
    for line in open(a.prompts, encoding="utf-8"):
        r = json.loads(line)
        _, ids = model.messages_ids(r["messages"])
        max_tokens = r.get("max_tokens", 128)
        answer, _, _ = model.generate(ids, max_tokens, ignore_eos=r.get("ignore_eos", False))
        if len(answer) < 2:
            continue
        shipped = PromptLookup(a.draft)
        s, _ = replay(ids, answer, shipped, pass_ms, max_tokens)
        f, _ = replay(ids, answer, PromptLookup(a.draft), free, max_tokens)
        b, _ = replay(ids, answer, CopyOracle(), free, max_tokens)
        note = "" if len(answer) >= a.min_tokens else " (too short, not counted)"
        print(f"| {r.get('name', '?')}{note} | {len(answer)} | {shipped.drafted} | {shipped.accepted} "
              f"| {s:.2f} | {f:.2f} | {b:.2f} |", flush=True)
        if not note and r.get("name") != "generic":
            counted["shipped"].append(s)
            counted["free"].append(f)
            counted["bound"].append(b)
    if counted["shipped"]:
        med = {k: statistics.median(v) for k, v in counted.items()}
        print(f"| median, gateway prompts ({len(counted['shipped'])}) | | | | {med['shipped']:.2f} "
              f"| {med['free']:.2f} | {med['bound']:.2f} |")


if __name__ == "__main__":
    main()
