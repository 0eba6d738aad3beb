"""Deduplicate extra training data against the three benchmarks (MMLU, GSM8K, MT-Bench).

A training text is a near-duplicate of a benchmark text when ANY of these holds:
  1. exact match after normalisation (lowercase, every run of non-alphanumerics -> one space);
  2. character 5-gram Jaccard similarity >= 0.5 (on the normalised text);
  3. cosine similarity of the L2-normalised MiniLM mean-pooled embeddings >= 0.85.
Benchmark texts: MMLU prompts, GSM8K test prompts + GSM8K train questions, MT-Bench turn 1 and
turn 2. train.py drops near-duplicates (and prints them); `python dedup.py FILE` only reports.
"""
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
JACCARD_MAX = 0.5
COSINE_MAX = 0.85


def norm(t):
    return re.sub(r"[^0-9a-z]+", " ", t.lower()).strip()


def grams(t, n=5):
    t = norm(t)
    return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))}


def benchmark_groups(data_dir=os.path.join(HERE, "data")):
    """-> {cache name: [benchmark texts]} (names match eval.py's embedding caches)."""
    def rows(name):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    mt = rows("mt_bench.jsonl")
    return {"mmlu": [r["prompt"] for r in rows("mmlu.jsonl")],
            "gsm8k": [r["prompt"] for r in rows("gsm8k.jsonl")],
            "gsm8k-train": [r["question"] for r in rows("gsm8k_train_questions.jsonl")],
            "mt_bench": [r["prompt"] for r in mt],
            "mt_bench-turn2": [r["turn2"] for r in mt]}


def benchmark_texts_and_embeddings(data_dir=os.path.join(HERE, "data")):
    """-> (texts, L2-normalised mean-pooled embeddings) of every benchmark text."""
    import features as F
    texts, embs = [], []
    for name, ts in benchmark_groups(data_dir).items():
        e = F.embed_cached(ts, name)["mean"]
        texts += ts
        embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return texts, np.vstack(embs)


def near_duplicates(texts, bench, emb_texts, emb_bench):
    """texts, bench: lists of str; emb_*: L2-normalised embeddings. -> list of (i, reason, bench_text)."""
    exact = {norm(b): b for b in bench}
    # inverted index of 5-grams -> benchmark ids, for the Jaccard test
    bgrams = [grams(b) for b in bench]
    index = {}
    for j, g in enumerate(bgrams):
        for x in g:
            index.setdefault(x, []).append(j)
    cos = emb_texts @ emb_bench.T
    found = []
    for i, t in enumerate(texts):
        if norm(t) in exact:
            found.append((i, "exact", exact[norm(t)]))
            continue
        g = grams(t)
        counts = {}
        for x in g:
            for j in index.get(x, ()):
                counts[j] = counts.get(j, 0) + 1
        best = max(((c / (len(g) + len(bgrams[j]) - c), j) for j, c in counts.items()), default=(0.0, -1))
        if best[0] >= JACCARD_MAX:
            found.append((i, f"jaccard {best[0]:.2f}", bench[best[1]]))
            continue
        j = int(np.argmax(cos[i]))
        if cos[i, j] >= COSINE_MAX:
            found.append((i, f"cosine {cos[i, j]:.2f}", bench[j]))
    return found, cos.max(1)


def main():
    import features as F
    import train
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data", "own_prompts.jsonl")
    texts = [t for t, _, _ in train.read_train_file(path)]
    bench, eb = benchmark_texts_and_embeddings()
    et = F.embed_cached(texts, "extra", verbose=False)["mean"]
    et = et / np.linalg.norm(et, axis=1, keepdims=True)
    found, maxcos = near_duplicates(texts, bench, et, eb)
    print(f"{len(texts)} texts; max cosine to a benchmark text: median {np.median(maxcos):.3f}, "
          f"max {maxcos.max():.3f}; near-duplicates: {len(found)}")
    for i, why, b in found:
        print(f"  [{i}] {why}: {texts[i][:80]!r} ~ {b[:80]!r}")


if __name__ == "__main__":
    main()
