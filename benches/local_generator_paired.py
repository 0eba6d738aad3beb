#!/usr/bin/env python3
"""Runs tiergate's engine (`local_generator --prompts FILE --serve`) and the Python loop
(`python_greedy.py --prompts FILE --serve`) side by side, both with the model loaded, and
alternates them prompt by prompt: each prompt runs on one side, then at once on the other,
the side that goes first alternating from one prompt and round to the next. Pairs measured
seconds apart see the same machine load, which on a shared machine swings within minutes.
Prints the `RESULT` lines, tagged with the model and the round, for
`local_generator_summary.py`. Called by `benches/local_generator.sh`.

  local_generator_paired.py --engine BIN --python PY --model-dir DIR --prompts FILE
      [--rounds N] [--no-spin] [--draft N]
"""
import argparse
import json
import os
import subprocess
import sys


def start(cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    for line in p.stdout:
        if line.startswith("READY"):
            return p
        print(line, end="")
    sys.exit(f"{cmd[0]} exited before it was ready")


def ask(p, name):
    p.stdin.write(name + "\n")
    p.stdin.flush()
    out = []
    for line in p.stdout:
        if line.startswith("DONE"):
            return out
        out.append(line)
    sys.exit("a benchmark process stopped")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-spin", action="store_true")
    ap.add_argument("--draft")
    a = ap.parse_args()
    model = os.path.basename(a.model_dir.rstrip("/"))
    spin = ["--no-spin"] if a.no_spin else []
    draft = ["--draft", a.draft] if a.draft else []
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "scripts", "local_model", "python_greedy.py")
    sides = {
        "tiergate": start([a.engine, a.model_dir, "--prompts", a.prompts, "--serve", *spin, *draft]),
        "python": start([a.python, script, a.model_dir, "--prompts", a.prompts, "--serve", *spin]),
    }
    with open(a.prompts) as f:
        names = [json.loads(line)["name"] for line in f if line.strip()]
    for r in range(1, a.rounds + 1):
        for i, name in enumerate(names):
            order = ["tiergate", "python"] if (r + i) % 2 else ["python", "tiergate"]
            load = open("/proc/loadavg").read().split()[0]
            for side in order:
                for line in ask(sides[side], name):
                    if line.startswith("RESULT "):
                        line = f"RESULT model={model} round={r} first={order[0]} load={load} {line[7:]}"
                    print(line, end="", flush=True)
    for side, p in sides.items():
        p.stdin.close()
        for line in p.stdout:
            print(f"# {side}: {line}", end="")
        p.wait()


if __name__ == "__main__":
    main()
