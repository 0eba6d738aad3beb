#!/usr/bin/env python3
"""Build a Hugging Face `tokenizer.json` (+ tokenizer_config.json) from GGUF metadata.

Only the byte-level BPE family (`tokenizer.ggml.model == "gpt2"`) is supported, with the
pre-tokenizers llama.cpp uses for the `tokenizer.ggml.pre` names below (llama.cpp
src/llama-vocab.cpp, `llm_tokenizer_bpe` constructor):

  smollm  (grouped with starcoder/refact/codeshell...):
      "\\p{N}"  then the GPT-2 regex
      "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
      -> every digit is its own pre-token (SmolLM2's upstream tokenizer.json expresses this as
         Digits(individual_digits=true) followed by ByteLevel(use_regex=true)).
  qwen2:
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
      -> single digits; upstream Qwen2 tokenizer.json also applies an NFC normalizer, kept here.

Token types from `tokenizer.ggml.token_type`: 3 (CONTROL) become special added tokens,
4 (USER_DEFINED) non-special added tokens (both are matched whole before BPE); 5 (UNUSED,
Qwen's [PAD...] filler rows) stay plain vocabulary entries so ids line up with the logits.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def pre_tokenizer_for(pre: str):
    if pre == "smollm":
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    raise SystemExit(f"tokenizer.ggml.pre={pre!r} not supported (add llama.cpp's regex for it first)")


def build_tokenizer(m) -> tuple[Tokenizer, dict]:
    """m: gguf2onnx.GGUFModel. Returns the tokenizer and a summary of its special ids."""
    if m.field("tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE (tokenizer.ggml.model=gpt2) GGUF tokenizers are supported")
    tokens = m.field("tokenizer.ggml.tokens")
    types = m.field("tokenizer.ggml.token_type")
    merges = m.field("tokenizer.ggml.merges")
    pre = m.field("tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate token strings in GGUF vocabulary")
    merge_pairs = [tuple(mg.split(" ", 1)) for mg in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, dropout=None, unk_token=None,
                              fuse_unk=False, byte_fallback=False, ignore_merges=False))
    norm, pret = pre_tokenizer_for(pre)
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pret
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append(AddedToken(t, special=(ty == TOKEN_CONTROL), normalized=False,
                                    single_word=False, lstrip=False, rstrip=False))
    tok.add_tokens(added)  # ids already exist in the vocab: they keep them
    for a in added:
        if tok.token_to_id(a.content) != vocab[a.content]:
            raise SystemExit(f"added token {a.content!r} got a new id")

    def tid(key):
        v = m.field(key)
        return int(v) if v is not None else None

    info = {
        "pre": pre,
        "bos_token_id": tid("tokenizer.ggml.bos_token_id"),
        "eos_token_id": tid("tokenizer.ggml.eos_token_id"),
        "eot_token_id": tid("tokenizer.ggml.eot_token_id"),
        "pad_token_id": tid("tokenizer.ggml.padding_token_id"),
        "unk_token_id": tid("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(m.field("tokenizer.ggml.add_bos_token", False)),
        "special_tokens": {t: vocab[t] for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL},
        "user_defined_tokens": {t: vocab[t] for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED},
    }
    # Stop ids: the GGUF eos (and eot when present), plus <|im_end|>/<|endoftext|> when the
    # vocabulary has them (ChatML models end a turn with <|im_end|>; <|endoftext|> ends a document).
    stop = []
    for k in ("eos_token_id", "eot_token_id"):
        if info[k] is not None and info[k] not in stop:
            stop.append(info[k])
    for t in ("<|im_end|>", "<|endoftext|>"):
        if t in vocab and vocab[t] not in stop:
            stop.append(vocab[t])
    info["stop_token_ids"] = stop
    return tok, info


def write_tokenizer(m, out_dir: str) -> dict:
    tok, info = build_tokenizer(m)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tokens = m.field("tokenizer.ggml.tokens")

    def name(i):
        return tokens[i] if i is not None else None
    added_decoder = {str(v): {"content": k, "special": True, "normalized": False, "lstrip": False,
                              "rstrip": False, "single_word": False}
                     for k, v in info["special_tokens"].items()}
    added_decoder.update({str(v): {"content": k, "special": False, "normalized": False, "lstrip": False,
                                   "rstrip": False, "single_word": False}
                          for k, v in info["user_defined_tokens"].items()})
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": info["add_bos_token"],
        "add_eos_token": False,
        "bos_token": name(info["bos_token_id"]),
        "eos_token": name(info["eos_token_id"]),
        "pad_token": name(info["pad_token_id"]),
        "unk_token": name(info["unk_token_id"]),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(m.ctx),
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [k for k in info["special_tokens"]
                                      if k not in (name(info["bos_token_id"]), name(info["eos_token_id"]))],
        "chat_template": m.field("tokenizer.chat_template"),
        "tiergate_stop_token_ids": info["stop_token_ids"],
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg[k]},
                  f, indent=2, ensure_ascii=False)
    return info


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------
SAMPLES = [
    "Hello, world! What is the capital of France?",
    "The year 2024 had 366 days; 3.14159 * 2 = 6.28318 and 1,000,000 > 999999.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # -> 5\n",
    "  leading spaces,\ttabs\t\tand trailing   \n\n\n",
    "Unicode: café, naïve, Zürich, 東京, Москва, مرحبا, 😀👍🏽, ∑∫√",
    "I'm sure they'll say we've done it; you'd THINK it's DONE'S",
    "fn main() { let x: Vec<u8> = vec![0x1F, 0xFF]; println!(\"{:?}\", x); }",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: I love cheese.",
]


def verify(tokenizer_json: str, info: dict, log=print) -> None:
    tok = Tokenizer.from_file(tokenizer_json)
    for s in SAMPLES:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != s:
            raise SystemExit(f"round trip failed: {s!r} -> {back!r}")
    # digits must be split one per token (both smollm and qwen2 pre-tokenizers isolate \p{N})
    ids = tok.encode("12345 67890", add_special_tokens=False).ids
    pieces = [tok.id_to_token(i) for i in ids]
    if any(len(p.lstrip("Ġ")) > 1 and p.lstrip("Ġ").isdigit() for p in pieces):
        raise SystemExit(f"digits were merged: {pieces}")
    for t, i in {**info["special_tokens"], **info["user_defined_tokens"]}.items():
        enc = tok.encode(t, add_special_tokens=False).ids
        if enc != [i]:
            raise SystemExit(f"special token {t!r} encodes as {enc}, expected [{i}]")
        if tok.encode(f"x{t}y", add_special_tokens=False).ids.count(i) != 1:
            raise SystemExit(f"special token {t!r} not matched inside text")
    for s in info["stop_token_ids"]:
        if tok.id_to_token(s) not in info["special_tokens"]:
            raise SystemExit(f"stop id {s} is not a control token")
    log(f"  tokenizer ok: {len(SAMPLES)} round trips, digits split ({pieces}), "
        f"{len(info['special_tokens'])} special + {len(info['user_defined_tokens'])} user-defined tokens single ids, "
        f"stop ids {info['stop_token_ids']}")
