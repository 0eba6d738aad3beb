#!/usr/bin/env python3
"""Check a provisioned (or user-exported) local-tier model directory.

  check_model.py MODEL_DIR [MODEL_DIR ...]

Checks, per directory:
  files       the files the local backend reads are present
  stamp       tiergate_model.json sha256 of every listed file matches (provisioned dirs only)
  io          ONNX inputs/outputs follow the Optimum decoder-with-past layout and agree with config.json
  tokenizer   special/stop ids from generation_config.json decode to single control tokens; the
              chat template renders and tokenizes without unknown pieces
  greedy      python_greedy reproduces every case of reference_greedy.json (provisioned dirs only)

Ends with the line 'N passed, N failed' and exits non-zero on any failure.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REQUIRED = ["model.onnx", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_files(d):
    missing = [f for f in REQUIRED if not os.path.exists(os.path.join(d, f))]
    assert not missing, f"missing {missing}"


def check_stamp(d):
    p = os.path.join(d, "tiergate_model.json")
    if not os.path.exists(p):
        return "skipped (no stamp)"
    stamp = json.load(open(p))
    for f, meta in stamp["files"].items():
        got = sha256_file(os.path.join(d, f))
        assert got == meta["sha256"], f"{f}: sha256 {got} != stamp {meta['sha256']}"
    return f"{len(stamp['files'])} files match"


def check_io(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    L, nkv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    g = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False).graph
    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64

    def sig(v):
        t = v.type.tensor_type
        return t.elem_type, [x.dim_value if x.HasField("dim_value") else x.dim_param for x in t.shape.dim]
    ins = {v.name: sig(v) for v in g.input}
    outs = {v.name: sig(v) for v in g.output}
    for n in ("input_ids", "attention_mask", "position_ids"):
        assert n in ins and ins[n][0] == I64 and len(ins[n][1]) == 2, f"input {n}: {ins.get(n)}"
    assert outs["logits"][0] == F and outs["logits"][1][2] == cfg["vocab_size"], f"logits {outs['logits']}"
    for i in range(L):
        for kv in ("key", "value"):
            for name, table in ((f"past_key_values.{i}.{kv}", ins), (f"present.{i}.{kv}", outs)):
                assert name in table, f"missing {name}"
                et, shape = table[name]
                assert et == F and shape[1] == nkv and shape[3] == hd, f"{name}: {table[name]}"
    assert len(ins) == 3 + 2 * L and len(outs) == 1 + 2 * L, "unexpected extra inputs/outputs"
    return f"{L} layers, {nkv} kv heads, head_dim {hd}, vocab {cfg['vocab_size']}"


def check_tokenizer(d):
    from tokenizers import Tokenizer
    import python_greedy
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    for i in eos:
        t = tok.id_to_token(i)
        assert t is not None and tok.encode(t, add_special_tokens=False).ids == [i], f"stop id {i} ({t!r})"
    tc = json.load(open(os.path.join(d, "tokenizer_config.json")))
    text = python_greedy.render_chat(tc["chat_template"], [{"role": "user", "content": "Hi 123"}])
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text, "chat template does not round-trip"
    return f"stop ids {eos}, templated prompt {len(ids)} tokens"


def check_greedy(d):
    p = os.path.join(d, "reference_greedy.json")
    if not os.path.exists(p):
        return "skipped (no reference_greedy.json)"
    import python_greedy
    ref = json.load(open(p))
    m = python_greedy.Model(d, "model.onnx", threads=2)
    n = 0
    for case in [ref] + ref.get("more_cases", []):
        text, ids = m.chat_ids(case["prompt"], case.get("system"))
        assert ids == case["prompt_ids"], f"{case['prompt']!r}: prompt ids differ"
        out, _, _ = m.generate(ids, case["max_new_tokens"])
        assert out == case["output_ids"], f"{case['prompt']!r}: got {out}, expected {case['output_ids']}"
        n += 1
    return f"{n} cases reproduced"


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    passed = failed = 0
    for d in argv:
        for name, fn in (("files", check_files), ("stamp", check_stamp), ("io", check_io),
                         ("tokenizer", check_tokenizer), ("greedy", check_greedy)):
            try:
                msg = fn(d)
                passed += 1
                print(f"ok   {os.path.basename(d.rstrip('/'))} {name}{': ' + msg if msg else ''}", flush=True)
            except Exception as e:  # report and go on
                failed += 1
                print(f"FAIL {os.path.basename(d.rstrip('/'))} {name}: {e}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
