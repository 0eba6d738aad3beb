#!/usr/bin/env python3
"""Turn RouteLLM's routing-outcome files into compact JSONL files under router-model/data/.

Usage:  python prepare_data.py [--src ../shared/data/routing-outcomes] [--out data]

Writes (contaminated prompts dropped exactly as RouteLLM's evals/benchmarks.py does):
  data/mmlu.jsonl      {"id", "subject", "prompt", "weak_correct", "strong_correct"}     TRAIN (5-fold CV by subject)
  data/gsm8k.jsonl     {"id", "prompt", "weak_correct", "strong_correct"}               EVALUATION ONLY
  data/mt_bench.jsonl  {"question_id", "category", "prompt", "weak_score", "strong_score"}  EVALUATION ONLY
                       (prompt = turn 1, the routed text; turn2 kept for deduplication;
                       scores = mean judge score over both turns)
  data/gsm8k_train_questions.jsonl  {"question"}  unlabelled, used only to deduplicate extra training data
  data/LICENSE         copied from the source folder
Only the standard library is used, so this runs without the venv.
"""
import argparse
import csv
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
    size = os.path.getsize(path)
    assert size < 10 * 1024 * 1024, f"{path} is {size} bytes (limit 10 MB)"
    print(f"wrote {path}: {len(rows)} rows, {size / 1e6:.2f} MB")


def as_bool(s):
    if s not in ("True", "False"):
        raise ValueError(f"expected True/False, got {s!r}")
    return s == "True"


def contaminated(src, bench):
    return {r["eval_prompt"] for r in read_jsonl(os.path.join(src, bench, "contaminated_prompts.jsonl"))}


def prepare_mmlu(src):
    bad = contaminated(src, "mmlu")
    rdir = os.path.join(src, "mmlu", "responses")
    rows, total = [], 0
    for fn in sorted(os.listdir(rdir)):
        if not (fn.startswith("mmlu_") and fn.endswith(".csv")):
            continue
        subject = fn[len("mmlu_"):-len(".csv")]
        with open(os.path.join(rdir, fn), encoding="utf-8", newline="") as f:
            for i, r in enumerate(csv.DictReader(f)):
                total += 1
                if r["prompt"] in bad:
                    continue
                rows.append({
                    "id": f"{subject}/{i}",
                    "subject": subject,
                    "prompt": r["prompt"],
                    "weak_correct": as_bool(r[WEAK]),
                    "strong_correct": as_bool(r[STRONG]),
                })
    print(f"MMLU: {len(rows)}/{total} after decontamination")
    return rows


def prepare_gsm8k(src):
    bad = contaminated(src, "gsm8k")
    rows, total = [], 0
    csv.field_size_limit(sys.maxsize)
    with open(os.path.join(src, "gsm8k", "gsm8k_responses.csv"), encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            total += 1
            if r["prompt"] in bad:
                continue
            rows.append({
                "id": i,
                "prompt": r["prompt"],
                "weak_correct": as_bool(r[WEAK]),
                "strong_correct": as_bool(r[STRONG]),
            })
    print(f"GSM8K: {len(rows)}/{total} after decontamination")
    return rows


def prepare_mt_bench(src):
    bad = contaminated(src, "mt_bench")
    qs = read_jsonl(os.path.join(src, "mt_bench", "question.jsonl"))
    judg = read_jsonl(os.path.join(src, "mt_bench", "judgements.jsonl"))
    scores = {}
    for j in judg:
        scores.setdefault((j["question_id"], j["model"]), []).append(float(j["score"]))
    rows = []
    for q in qs:
        t1, t2 = q["turns"][0], q["turns"][1]
        if t1 in bad or t2 in bad:
            continue
        w, s = scores[(q["question_id"], WEAK)], scores[(q["question_id"], STRONG)]
        assert len(w) == 2 and len(s) == 2, q["question_id"]
        rows.append({
            "question_id": q["question_id"],
            "category": q.get("category", ""),
            "prompt": t1,
            "turn2": t2,
            "weak_score": sum(w) / 2,
            "strong_score": sum(s) / 2,
        })
    print(f"MT-Bench: {len(rows)}/{len(qs)} after decontamination")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(HERE, "..", "..", "shared", "data", "routing-outcomes"),
                    help="folder with mmlu/, gsm8k/, mt_bench/ (default: ../shared/data/routing-outcomes "
                         "relative to the repository root)")
    ap.add_argument("--out", default=os.path.join(HERE, "data"))
    a = ap.parse_args()
    src = os.path.abspath(a.src)
    if not os.path.isdir(os.path.join(src, "mmlu")):
        sys.exit(f"no mmlu/ under {src}: pass --src")
    os.makedirs(a.out, exist_ok=True)
    write_jsonl(os.path.join(a.out, "mmlu.jsonl"), prepare_mmlu(src))
    write_jsonl(os.path.join(a.out, "gsm8k.jsonl"), prepare_gsm8k(src))
    write_jsonl(os.path.join(a.out, "mt_bench.jsonl"), prepare_mt_bench(src))
    # GSM8K train questions (no outcomes): only used to deduplicate hand-written data.
    train_q = [{"question": r["question"]} for r in read_jsonl(os.path.join(src, "gsm8k", "train.jsonl"))]
    write_jsonl(os.path.join(a.out, "gsm8k_train_questions.jsonl"), train_q)
    shutil.copyfile(os.path.join(src, "LICENSE"), os.path.join(a.out, "LICENSE"))


if __name__ == "__main__":
    main()
