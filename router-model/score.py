#!/usr/bin/env python3
"""Reference scorer: raw request -> router score, exactly the serving path the Rust port mirrors
(no caches, batch of one). Also measures its latency.

    python score.py "Prove that sqrt(2) is irrational."           # prints the score
    python score.py --messages '[{"role":"user","content":"hi"}]'  # an OpenAI messages array
    python score.py --latency                                      # p50/p99 over sample prompts
    python score.py --parity results/parity.jsonl                  # test vectors for the Rust port
    python score.py --percentiles                                  # the model card's percentile table
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import features as F  # noqa: E402


class Scorer:
    def __init__(self, head=os.path.join(HERE, "head.onnx"), threads=2, graph=None):
        """graph: the encoder graph (default: the one the gateway serves on this CPU)."""
        import onnxruntime as ort
        self.tok = F.load_tokenizer()
        self.enc = F.Encoder(graph, threads=threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.head = ort.InferenceSession(head, so, providers=["CPUExecutionProvider"])

    def features(self, text):
        h, m = self.enc.run([F.encode(self.tok, text)])
        mean = F.pool(h, m)[0][0]
        mean = mean / np.linalg.norm(mean)
        return np.concatenate([mean, np.array(F.hand_features(text), np.float32)]).astype(np.float32)

    def score(self, text):
        return float(self.head.run(["score"], {"features": self.features(text)[None, :]})[0][0, 0])


PARITY_CASES = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "Translate to German: the train is late again."}]},
    {"messages": [{"role": "system", "content": "You are a support bot. Plans: Free, Team, Business."},
                  {"role": "user", "content": "first question"}, {"role": "assistant", "content": "answer"},
                  {"role": "user", "content": "Which plan has SSO?"}]},
    {"messages": [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
                  {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url"},
                                               {"type": "text", "text": "part two"}]}]},
    {"messages": [{"role": "user", "content": "Prove that there are infinitely many primes p with p = 3 (mod 4)."}]},
    {"messages": [{"role": "user", "content": "Caf\u00e9 na\u00efve \u00c9T\u00c9 \u4f60\u597d\u4e16\u754c \U0001F600 "
                                              "tab\there  multiple   spaces\nnew line \u00df \u0130stanbul"}]},
    {"messages": [{"role": "user", "content": "fn main() { let x: Vec<u32> = (0..10).map(|i| i * i).collect(); "
                                              "println!(\"{:?}\", x); } // why does this not compile with x: u32?"}]},
    {"messages": [{"role": "user", "content": "word " * 400 + "What is the last word?"}]},
    {"messages": [{"role": "user", "content": ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 60)
                                              + "Summarise the text above in one line."}]},
    {"messages": [{"role": "user", "content": "x" * 3000}]},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": []},
    {"messages": [{"role": "developer", "content": "Be terse."}, {"role": "system", "content": "Plans: Free, Team."},
                  {"role": "user", "content": "What is 2+2?"}]},
]


def write_parity(path, threads):
    """Test vectors: for each case the scored text, model input ids, feature vector and score of
    the integer graph, and the score of the float model.onnx (what CPUs without VNNI run).
    Needs a CPU whose integer products are exact (the integer graph's scores would be wrong)."""
    if not F.integer_kernels_exact():
        sys.exit("--parity needs a CPU with VNNI (or not x86): see FEATURES.md section 4")
    s, fl = Scorer(threads=threads, graph=F.GRAPH_PATH), Scorer(threads=threads, graph=F.MODEL_PATH)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for case in PARITY_CASES:
            text = F.scored_text(case["messages"])
            x = s.features(text)
            f.write(json.dumps({"messages": case["messages"], "scored_text": text,
                                "input_ids": F.encode(s.tok, text), "features": [round(float(v), 7) for v in x],
                                "score": round(s.score(text), 7), "score_float": round(fl.score(text), 7)},
                               ensure_ascii=False) + "\n")
    print(f"wrote {len(PARITY_CASES)} test vectors to {path}")


def percentiles(s):
    """The model card's table of score percentiles: benchmark scores from results/scores.jsonl
    (MMLU out-of-fold, GSM8K and MT-Bench turn 1 by head.onnx), the hand-written prompts scored
    here by head.onnx (in-sample: they are in its training data)."""
    groups = {"MMLU (out-of-fold)": [], "GSM8K": [], "MT-Bench turn 1": []}
    names = {"mmlu": "MMLU (out-of-fold)", "gsm8k": "GSM8K", "mt_bench": "MT-Bench turn 1"}
    for line in open(os.path.join(HERE, "results", "scores.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        groups[names[r["benchmark"]]].append(r["score"])
    from train import read_train_file
    own = read_train_file(os.path.join(HERE, "data", "own_prompts.jsonl"))   # (scored text, label, weight)
    for label, name in ((0, "hand-written routine (in-sample)"), (1, "hand-written hard (in-sample)")):
        groups[name] = [s.score(text) for text, lab, _ in own if lab == label]
    print("| prompts | p10 | p25 | p50 | p75 | p90 |")
    print("|---|---|---|---|---|---|")
    for name, v in groups.items():
        print(f"| {name} | " + " | ".join(f"{np.percentile(v, q):.3f}" for q in (10, 25, 50, 75, 90)) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", nargs="?")
    ap.add_argument("--messages", help="JSON array of OpenAI chat messages")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parity", help="write test vectors (text, ids, features, score) to this JSONL")
    ap.add_argument("--percentiles", action="store_true", help="print the score percentile table")
    a = ap.parse_args()
    if a.parity:
        write_parity(a.parity, a.threads)
        return
    s = Scorer(threads=a.threads)
    if a.percentiles:
        percentiles(s)
        return
    if a.latency:
        rows = [json.loads(line) for line in open(os.path.join(HERE, "data", "mmlu.jsonl"), encoding="utf-8")]
        texts = [r["prompt"] for r in rows[::47]][:300]   # fixed sample, long and short prompts
        long_text = " ".join(texts)                         # ~100k characters
        for t in texts[:20]:
            s.score(t)  # warm-up
        for name, sample in [("MMLU sample (300 prompts)", texts),
                             ("18-token sentence", ["The weather is nice today, shall we go for a walk in the park?"] * 300),
                             (f"{len(long_text)}-character prompt", [long_text] * 100)]:
            ts = []
            for t in sample:
                t0 = time.perf_counter()
                s.score(t)
                ts.append((time.perf_counter() - t0) * 1000)
            ts = np.array(ts)
            print(f"{name}: p50 {np.median(ts):.2f} ms, p99 {np.percentile(ts, 99):.2f} ms, "
                  f"min {ts.min():.2f} ms ({a.threads} intra-op threads, batch 1, tokenization included)")
        print("load average (1/5/15 min) at the end: %.2f %.2f %.2f (2 cores; other jobs inflate these)"
              % os.getloadavg())
        return
    if a.messages and a.text:
        ap.error("give a text or --messages, not both")
    messages = json.loads(a.messages) if a.messages else None
    if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
        ap.error("--messages must be a JSON array of message objects")
    text = F.scored_text(messages) if messages is not None else a.text
    if text is None:
        ap.error("give a text, --messages or --latency")
    print(f"{s.score(text):.4f}")


if __name__ == "__main__":
    main()
