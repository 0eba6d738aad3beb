#!/usr/bin/env python3
"""Plain Python onnxruntime KV-cache greedy loop over an Optimum-layout decoder model.

This is the correctness reference for tiergate's Rust engine (same model dir, same prompt,
same greedy ids) and the baseline of the local-tier benchmark.

  python_greedy.py MODEL_DIR --prompt "What is the capital of France?" --max-new-tokens 32
  python_greedy.py MODEL_DIR --bench            # ~50-token prompt, 64 decoded tokens, timings, RSS
  python_greedy.py MODEL_DIR --json out.json    # machine-readable result (ids, text, timings)
  python_greedy.py MODEL_DIR --prompts benches/local_prompts.jsonl   # one RESULT line per prompt

The chat template comes from tokenizer_config.json and is rendered with Jinja2 the way
transformers does it (sandboxed, trim_blocks + lstrip_blocks, add_generation_prompt=True).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# ~50 tokens once the chat template (with its default system prompt) is applied:
# 52 for SmolLM2-135M-Instruct, 51 for Qwen2.5-Coder-0.5B-Instruct
BENCH_PROMPT = "Summarise in one sentence: the report is due on Friday and the meeting moved to room 4."


def render_chat(template: str, messages, add_generation_prompt=True, **extra) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **extra)


class Model:
    def __init__(self, model_dir: str, onnx_name: str = "model.onnx", threads: int = 2, spin: bool = True):
        self.dir = model_dir
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            self.tok_config = json.load(f)
        with open(os.path.join(model_dir, "generation_config.json")) as f:
            gen = json.load(f)
        eos = gen.get("eos_token_id", [])
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        self.sess = ort.InferenceSession(os.path.join(model_dir, onnx_name), so,
                                         providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t0
        self.n_layers = self.config["num_hidden_layers"]
        self.n_kv = self.config["num_key_value_heads"]
        self.head_dim = self.config["head_dim"]
        # logits, then the cache in layer order; a graph may carry more outputs (not fetched).
        self.out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]

    def chat_ids(self, user: str, system: str | None = None) -> tuple[str, list[int]]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.messages_ids(msgs)

    def messages_ids(self, msgs) -> tuple[str, list[int]]:
        text = render_chat(self.tok_config["chat_template"], msgs, add_generation_prompt=True,
                           bos_token=self.tok_config.get("bos_token") or "",
                           eos_token=self.tok_config.get("eos_token") or "")
        # special tokens in the rendered text are matched as single ids; no BOS is added
        # (add_bos_token is false for both provisioned models)
        return text, self.tokenizer.encode(text, add_special_tokens=False).ids

    def generate(self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False):
        past = {}
        for i in range(self.n_layers):
            for kv in ("key", "value"):
                past[f"past_key_values.{i}.{kv}"] = np.zeros((1, self.n_kv, 0, self.head_dim), np.float32)
        n = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        out_ids, step_times, logprobs = [], [], []
        total = n
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            res = self.sess.run(self.out_names, {**feeds, **past})
            logits = res[0][0, -1]
            nxt = int(np.argmax(logits))
            step_times.append(time.perf_counter() - t0)
            lse = float(np.log(np.exp(logits - logits.max()).sum()) + logits.max())
            logprobs.append(float(logits[nxt]) - lse)
            out_ids.append(nxt)
            if nxt in self.stop_ids and not ignore_eos:
                break
            for name, val in zip(self.out_names[1:], res[1:]):
                past[name.replace("present.", "past_key_values.")] = val
            total += 1
            feeds = {"input_ids": np.array([[nxt]], np.int64),
                     "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.array([[total - 1]], np.int64)}
        return out_ids, step_times, logprobs

    def _pass(self, ids: list[int], past: dict, start: int):
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, start + len(ids)), np.int64),
                 "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None], **past}
        res = self.sess.run(self.out_names, feeds)
        return res[0][0], {n.replace("present.", "past_key_values."): v for n, v in zip(self.out_names[1:], res[1:])}

    def row_drift(self, ids: list[int], n: int = 7) -> float:
        """Largest |logit| difference between one pass over the last n tokens of ids and n
        one-token passes over them (same cache before): 0.0 when the graph's rows are exact,
        i.e. when speculative verification gives plain greedy decoding's tokens."""
        empty = {f"past_key_values.{i}.{kv}": np.zeros((1, self.n_kv, 0, self.head_dim), np.float32)
                 for i in range(self.n_layers) for kv in ("key", "value")}
        head, tail = ids[:-n], ids[-n:]
        _, past = self._pass(head, empty, 0)
        multi, _ = self._pass(tail, past, len(head))
        worst = 0.0
        for j, t in enumerate(tail):
            one, past = self._pass([t], past, len(head) + j)
            worst = max(worst, float(np.abs(one[0] - multi[j]).max()))
        return worst

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.stop_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def rss_mib() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f)
    cur = int(st["VmRSS"].split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return cur, peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--onnx", default="model.onnx", help="graph file inside MODEL_DIR")
    ap.add_argument("--prompt", action="append", help="user message (repeatable)")
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true", help="session.intra_op.allow_spinning=0")
    ap.add_argument("--bench", action="store_true",
                    help="~50-token prompt, 64 new tokens ignoring EOS, report prefill ms and decode tok/s")
    ap.add_argument("--repeat", type=int, default=3, help="bench repetitions (best prefill / median decode)")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--prompts", dest="prompts_file",
                    help="JSON lines (name, messages, max_tokens, ignore_eos): one timed greedy run each")
    ap.add_argument("--serve", action="store_true",
                    help="with --prompts: read prompt names from stdin, one run per line, each answered by DONE")
    args = ap.parse_args(argv)

    m = Model(args.model_dir, args.onnx, args.threads, spin=not args.no_spin)
    print(f"# model {args.model_dir}/{args.onnx}: loaded in {m.load_s:.2f}s, "
          f"ORT {ort.__version__}, intra_op_threads={args.threads}, spinning={not args.no_spin}", flush=True)
    results = []
    if args.prompts_file:
        m.generate(m.chat_ids(BENCH_PROMPT)[1], 8, ignore_eos=True)  # warm-up
        with open(args.prompts_file) as f:
            prompts = [json.loads(line) for line in f if line.strip()]
        def run_prompt(p):
            _, ids = m.messages_ids(p["messages"])
            out, times, _ = m.generate(ids, p.get("max_tokens", 128), ignore_eos=p.get("ignore_eos", False))
            rate = (len(times) - 1) / sum(times[1:]) if len(times) > 1 else float("nan")
            # the same checksum as benches/local_generator.rs, to see that both sides generated the same ids
            ids_sum = sum((i + 1) * t for i, t in enumerate(out))
            print(f"RESULT side=python prompt={p['name']} prompt_tokens={len(ids)} new_tokens={len(out)} "
                  f"prefill_ms={times[0] * 1000:.1f} decode_tok_s={rate:.2f} ids_sum={ids_sum}", flush=True)
        if args.serve:
            # driven by benches/local_generator_paired.py: one prompt name per line on stdin
            by_name = {p["name"]: p for p in prompts}
            print("READY", flush=True)
            for line in iter(sys.stdin.readline, ""):
                p = by_name.get(line.strip())
                if p:
                    run_prompt(p)
                else:
                    print(f"ERROR no prompt {line.strip()!r}", flush=True)
                print("DONE", flush=True)
        else:
            for p in prompts:
                run_prompt(p)
        cur, peak = rss_mib()
        print(f"rss_mib={cur:.0f} peak_rss_mib={peak:.0f}")
        return
    if args.bench:
        text, ids = m.chat_ids(BENCH_PROMPT)
        prefills, decodes = [], []
        for r in range(args.repeat + 1):  # first run is warm-up
            out, times, _ = m.generate(ids, 65, ignore_eos=True)
            if r == 0:
                continue
            prefills.append(times[0] * 1000)
            decodes.append(64 / sum(times[1:]))
        cur, peak = rss_mib()
        res = {"bench": True, "prompt_tokens": len(ids), "prefill_ms": min(prefills),
               "prefill_ms_all": prefills, "decode_tok_s": float(np.median(decodes)), "decode_tok_s_all": decodes,
               "rss_mib": cur, "peak_rss_mib": peak, "text": m.decode(out)}
        print(f"prompt_tokens={len(ids)} prefill_ms={res['prefill_ms']:.1f} "
              f"decode_tok_s={res['decode_tok_s']:.2f} (64 tokens) rss_mib={cur:.0f} peak_rss_mib={peak:.0f}")
        print(f"  prefill runs {[round(x, 1) for x in prefills]}, decode runs {[round(x, 2) for x in decodes]}")
        print("  text:", repr(res["text"][:200]))
        results.append(res)
    for p in args.prompt or []:
        text, ids = m.chat_ids(p, args.system)
        out, times, lps = m.generate(ids, args.max_new_tokens)
        answer = m.decode(out)
        res = {"prompt": p, "system": args.system, "templated": text, "prompt_ids": ids, "output_ids": out,
               "text": answer, "prefill_ms": times[0] * 1000,
               "decode_tok_s": (len(times) - 1) / sum(times[1:]) if len(times) > 1 else None,
               "mean_logprob": float(np.mean(lps)),
               "finish_reason": "stop" if out and out[-1] in m.stop_ids else "length"}
        results.append(res)
        print(f"\n### {p!r}\nprompt_ids ({len(ids)}): {ids}\noutput_ids ({len(out)}): {out}\n"
              f"finish_reason: {res['finish_reason']}  mean_logprob: {res['mean_logprob']:.3f}\n--- text ---\n{answer}")
    cur, peak = rss_mib()
    print(f"\n# rss_mib={cur:.0f} peak_rss_mib={peak:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
