#!/usr/bin/env python3
"""Helpers for scripts/check-report-page (standard library only).

    history LEDGER N        add N synthetic rows spread over the past 24 hours
    send URL FILE.jsonl     post every request of a workload (8 at a time)
    check DOM_FILE LOG_FILE fail unless every chart has marks and the log has no console error
"""

import concurrent.futures
import json
import random
import re
import sqlite3
import sys
import time
import urllib.request
from html.parser import HTMLParser

CHARTS = ("savings", "tiers", "latency", "rules")


def history(ledger, n):
    """A day of believable traffic, so every chart has a shape to draw."""
    rng = random.Random(42)
    now = int(time.time() * 1000)
    rows = []
    for i in range(n):
        ts = now - 86_400_000 + int(86_400_000 * i / n) + rng.randint(0, 30_000)
        # Prompt sizes are long-tailed: most requests are short.
        p = max(5, int(rng.lognormvariate(5.3, 0.9)))
        c = rng.randint(10, 600)
        baseline = (p * 2.5 + c * 10.0) / 1e6
        if p < 300:
            tier, rule, model = "small", "routine", "demo-small"
            latency = rng.lognormvariate(4.3, 0.5)
            cost = 0.0
        else:
            tier, rule, model = "cloud", "default", "demo-cloud"
            latency = rng.lognormvariate(7.0, 0.5)
            cost = baseline
        outcome, status = ("ok", 200) if rng.random() > 0.02 else ("upstream_error", 502)
        ttft = latency * rng.uniform(0.2, 0.5) if outcome == "ok" else None
        rows.append((ts, f"hist-{i:05d}", "key-0123456789ab", "tiergate-auto", tier, model,
                     p / (p + 128), "length", "balanced", rule, p, c, 0, ttft, latency,
                     rng.uniform(0.05, 0.6), cost, baseline, outcome, status, i % 3 == 0, 0, 0))
    db = sqlite3.connect(ledger, timeout=10)
    db.executemany(
        "INSERT INTO requests (ts_ms, request_id, api_key_id, requested_model, tier, backend_model,"
        " score, scorer, policy, rule, prompt_tokens, completion_tokens, tokens_estimated, ttft_ms,"
        " latency_ms, gateway_ms, cost_usd, baseline_cost_usd, outcome, http_status, streamed,"
        " fallback, escalated) VALUES (" + ",".join("?" * 23) + ")", rows)
    db.commit()


def send(url, path):
    bodies = [line for line in open(path, encoding="utf-8") if line.strip()]

    def post(body):
        req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", body.encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, bodies))
    print(f"sent {len(statuses)} requests, {statuses.count(200)} answered 200")


class Charts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.current = None
        self.marks = {c: 0 for c in CHARTS}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and a.get("data-chart") in self.marks:
            self.current = a["data-chart"]
        elif self.current and "mark" in (a.get("class") or "").split():
            self.marks[self.current] += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def check(dom_file, log_file):
    parser = Charts()
    parser.feed(open(dom_file, encoding="utf-8").read())
    problems = [f"chart `{c}` drew nothing" for c, n in parser.marks.items() if n == 0]
    # With --enable-logging=stderr, Chromium logs each console message, uncaught page
    # errors included, as `INFO:CONSOLE:line] "text", source: …` (older builds:
    # `CONSOLE(line)]`). Its own D-Bus and GPU complaints on a headless box are not ours.
    console = [l for l in open(log_file, encoding="utf-8", errors="replace")
               if re.search(r":CONSOLE[:(]|Uncaught|Failed to load resource", l)]
    problems += [f"console: {l.strip()}" for l in console]
    print("marks per chart:", json.dumps(parser.marks))
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print("ok: every chart rendered, no console messages")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "history":
        history(args[0], int(args[1]))
    elif cmd == "send":
        send(args[0], args[1])
    elif cmd == "check":
        check(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")
