#!/usr/bin/env python3
"""A stand-in OpenAI-compatible server for demos and page checks: no model, no network.

Answers POST /v1/chat/completions (whole or streamed, with usage when asked) with filler
text whose length and delay depend on the model name and the prompt, so a replayed
workload gives a report with believable spread: models whose name contains `small` answer
in tens of milliseconds, others in hundreds. Deterministic for a given prompt.

    python3 scripts/fake_upstream.py --port 8091
"""

import argparse
import hashlib
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the gateway routes each request to the cheapest tier able to answer it and "
         "records what it cost and how long it took").split()


def text_of(messages):
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return "\n".join(out)


def plan(model, prompt):
    """Completion length and timing for this model and prompt (seconds)."""
    h = int(hashlib.sha256((model + prompt).encode()).hexdigest()[:8], 16)
    prompt_tokens = max(1, len(prompt) // 4)
    small = "small" in model
    # Longer prompts tend to want longer answers; the hash adds spread.
    completion = 20 + (h % 120) + min(prompt_tokens // 3, 300)
    if small:
        ttft, per_token = 0.010 + (h % 40) / 1000, 0.0004
    else:
        ttft, per_token = 0.150 + (h % 400) / 1000, 0.0015
    return prompt_tokens, completion, ttft, per_token


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        model = body.get("model", "")
        prompt = text_of(body.get("messages", []))
        p_tok, c_tok, ttft, per_token = plan(model, prompt)
        words = [WORDS[i % len(WORDS)] for i in range(c_tok)]
        usage = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}
        base = {"id": "chatcmpl-demo", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            time.sleep(ttft + per_token * c_tok)
            out = dict(base, object="chat.completion", usage=usage, choices=[{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": " ".join(words)}}])
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def send(obj):
            payload = obj if isinstance(obj, str) else json.dumps(obj)
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def chunk(delta, finish=None, **extra):
            return dict(base, object="chat.completion.chunk", choices=[
                {"index": 0, "delta": delta, "finish_reason": finish}], **extra)

        time.sleep(ttft)
        send(chunk({"role": "assistant", "content": ""}))
        for i in range(0, len(words), 8):
            time.sleep(per_token * 8)
            send(chunk({"content": " ".join(words[i:i + 8]) + " "}))
        send(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            send(dict(base, object="chat.completion.chunk", choices=[], usage=usage))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8091)
    a = ap.parse_args()
    ThreadingHTTPServer((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
