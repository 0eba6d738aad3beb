#!/usr/bin/env python3
"""Decode-speed ratios from a `benches/local_generator.sh` log: engine / Python per model,
prompt and round (same prompt, same round, so both sides saw the same machine load), and
their medians.

  python3 benches/local_generator_summary.py LOG

A pair counts towards the medians only when Python decoded at least MIN_TOKENS tokens: a
two-token answer is one decode step, too short to time. "same" says whether the engine's
tokens equal Python's (plain) and the plain engine's (lookup alone and speculative as
served, lookup + draft head).
"""
import statistics
import sys

MIN_TOKENS = 16


def main(path):
    rows = {}
    for line in open(path):
        if line.startswith("RESULT "):
            kv = dict(f.split("=", 1) for f in line.split()[1:])
            rows[(kv["model"], kv["prompt"], int(kv["round"]), kv["side"])] = kv
    print("\n# decode tok/s, engine / python, per round (same model, prompt, round)")
    print("| model | prompt | round | new tokens | python tok/s | plain ratio | lookup ratio | spec ratio "
          "| accepted/drafted | head right/guessed | spec steps | plain same as python | spec same as plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    by = {}
    nan = float("nan")
    for model, prompt, rnd in sorted({k[:3] for k in rows}):
        py = rows.get((model, prompt, rnd, "python"))
        plain = rows.get((model, prompt, rnd, "tiergate-plain"))
        # `lookup`: prompt lookup alone, run only when the model has a draft head; `spec`:
        # speculation as served (lookup, and the head's guesses where lookup has none).
        lookup = rows.get((model, prompt, rnd, "tiergate-lookup"))
        spec = rows.get((model, prompt, rnd, "tiergate-spec"))
        if not (py and plain):
            continue
        base = float(py["decode_tok_s"])
        rp = float(plain["decode_tok_s"]) / base
        rl = float(lookup["decode_tok_s"]) / base if lookup else nan
        rs = float(spec["decode_tok_s"]) / base if spec else nan
        counted = int(py["new_tokens"]) >= MIN_TOKENS
        acc = f'{spec["accepted"]}/{spec["drafted"]}' if spec else "-"
        guessed = int(spec.get("guessed", 0)) if spec else 0
        right = int(spec.get("guessed_right", 0)) if spec else 0
        steps = spec["steps"] if spec else "-"
        same_py = py["ids_sum"] == plain["ids_sum"]
        same_spec = all(r["ids_sum"] == plain["ids_sum"] for r in (lookup, spec) if r) if spec else "-"
        mark = "" if counted else " (too short, not counted)"
        print(f"| {model} | {prompt}{mark} | {rnd} | {py['new_tokens']} | {base:.2f} | {rp:.2f} | {rl:.2f} | {rs:.2f} "
              f"| {acc} | {right}/{guessed} | {steps} | {same_py} | {same_spec} |")
        if counted:
            for key in ((model, prompt), (model, "all prompts"), (model, "all but generic")):
                if key[1] == "all but generic" and prompt == "generic":
                    continue
                by.setdefault(key, []).append((rp, rs, same_spec is True, int(spec["accepted"]) if spec else 0,
                                               int(spec["drafted"]) if spec else 0, rl, right, guessed))
    print("\n# medians over rounds (pairs with at least %d decoded tokens)" % MIN_TOKENS)
    print("| model | prompt | pairs | plain ratio (min-max) | lookup ratio (min-max) | spec ratio (min-max) "
          "| spec same as plain | acceptance | head right |")
    print("|---|---|---|---|---|---|---|---|---|")

    def span(xs):
        xs = [x for x in xs if x == x]
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"
    for (model, prompt), v in sorted(by.items()):
        acc, drafted = sum(x[3] for x in v), sum(x[4] for x in v)
        right, guessed = sum(x[6] for x in v), sum(x[7] for x in v)
        rate = f"{acc / drafted:.0%} of {drafted}" if drafted else "-"
        head = f"{right / guessed:.0%} of {guessed}" if guessed else "-"
        print(f"| {model} | {prompt} | {len(v)} | {span(x[0] for x in v)} | {span(x[5] for x in v)} "
              f"| {span(x[1] for x in v)} | {sum(x[2] for x in v)}/{len(v)} | {rate} | {head} |")


if __name__ == "__main__":
    main(sys.argv[1])
