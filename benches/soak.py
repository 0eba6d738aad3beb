#!/usr/bin/env python3
"""Soak test: a bounded loopback load against the gateway, with memory watched.

Runs the release gateway against the load benchmark's fake upstream (`bench-upstream`,
20 ms per answer) and drives it with two open-loop load generators (`bench-loadgen`) at
fixed rates, whole JSON answers and SSE streams side by side, for 60 s (`--quick`: 20 s).
The gateway's RSS is sampled every second. Verdict, printed at the end:

    PASS  when no request failed, the ledger holds a row for every request sent, and every
          RSS sample after the warm-up (the first quarter) is within ±10 % of their median.

    benches/soak.py                     # 60 s at 100 + 50 req/s
    benches/soak.py --quick             # 20 s smoke run
    benches/soak.py --rate 200          # whole answers at 200 req/s, streams at 100 req/s

Everything listens on 127.0.0.1. The helpers (release build, process handling, RSS of a
process tree) are those of `scripts/bench-load`. Not part of the CI suite: it needs a
release build and a minute of two cores.
"""

from __future__ import annotations

import argparse
import atexit
import os
import importlib.machinery
import importlib.util
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_loader = importlib.machinery.SourceFileLoader("bench_load", str(ROOT / "scripts" / "bench-load"))
_spec = importlib.util.spec_from_loader("bench_load", _loader)
bench = importlib.util.module_from_spec(_spec)
_loader.exec_module(bench)

TOLERANCE = 0.10


def say(msg: str) -> None:
    print(f"[soak] {msg}", flush=True)


def body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "Capital of France?"}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 s instead of 60 s")
    ap.add_argument("--duration", type=float, help="seconds of load (default 60, --quick 20)")
    ap.add_argument("--rate", type=float, default=100.0,
                    help="whole-answer requests per second; streams run at half this rate")
    ap.add_argument("--latency-ms", type=int, default=20, help="the fake upstream's latency")
    a = ap.parse_args()
    duration = a.duration or (20.0 if a.quick else 60.0)
    warmup = duration / 4
    atexit.register(bench.cleanup)

    bins = bench.build()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    up, upstream = bench.spawn_listening([str(bins["bench-upstream"]), "--listen", "127.0.0.1:0", "--latency-ms",
                                          str(a.latency_ms)], None, work / "upstream.log")
    tg, port, secret = bench.start_tiergate(bins, work, upstream, None, work / "tiergate.log")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    load = Path("/proc/loadavg").read_text().split()[:3]
    say(f"load average before: {' '.join(load)} ({os.cpu_count()} CPUs)")
    say(f"{duration:.0f} s at {a.rate:g} req/s whole + {a.rate / 2:g} req/s streamed "
        f"(upstream {a.latency_ms} ms); RSS every 1 s, warm-up {warmup:.0f} s; logs in {work}")

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, bench.rss_mib(tg.pid)))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # The router is on: `tiergate-auto` is scored and routed by the shipped policy.
    gens = [
        subprocess.Popen([str(bins["bench-loadgen"]), "--url", url, "--body", body("tiergate-auto", stream),
                          "--rate", str(rate), "--duration", str(duration), "--warmup", "0",
                          "--timeout", "10", "--header", "content-type: application/json",
                          "--header", f"authorization: Bearer {secret}"],
                         stdout=subprocess.PIPE, env=bench.child_env())
        for stream, rate in ((False, a.rate), (True, a.rate / 2))
    ]
    results = []
    for g in gens:
        out, _ = g.communicate(timeout=duration + 60)
        results.append(json.loads(out))
    stop.set()
    sampler.join()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
        ready = json.loads(r.read())
    bench.stop(tg)  # SIGTERM: graceful shutdown closes the ledger
    rows = sqlite3.connect(work / "ledger.db").execute("SELECT COUNT(*), SUM(outcome = 'ok') FROM requests").fetchone()

    sent = sum(r["scheduled"] for r in results)
    errors = sum(r["errors"] for r in results)
    for name, r in zip(("whole", "stream"), results):
        lat = r["latency_ms"] or {}
        say(f"{name:6}: {r['ok']}/{r['scheduled']} ok, {r['ok_rps']:.1f} req/s, latency p50 {lat.get('p50')} ms "
            f"p99 {lat.get('p99')} ms; errors {r['error_kinds']}" + (f" first: {r['first_error']}"
                                                                     if r["first_error"] else ""))
    after = [rss for t, rss in samples if t >= warmup]
    median = statistics.median(after) if after else 0.0
    lo, hi = (min(after), max(after)) if after else (0.0, 0.0)
    flat = bool(after) and all(abs(x - median) <= TOLERANCE * median for x in after)
    # Least-squares slope after the warm-up: a leak shows as a steady climb even inside ±10 %.
    pts = [(t, rss) for t, rss in samples if t >= warmup]
    slope = statistics.linear_regression([t for t, _ in pts], [r for _, r in pts]).slope * 60 if len(pts) > 1 else 0.0
    (work / "rss.json").write_text(json.dumps(samples))
    say(f"RSS MiB: start {samples[0][1]:.1f}, after warm-up median {median:.1f}, min {lo:.1f}, max {hi:.1f} "
        f"({100 * (lo - median) / median:+.1f} % .. {100 * (hi - median) / median:+.1f} %), end {samples[-1][1]:.1f}, "
        f"trend {slope:+.2f} MiB/min (samples: {work / 'rss.json'})")
    say(f"ledger: {rows[0]} rows ({rows[1]} ok) for {sent} requests sent; dropped "
        f"{ready.get('ledger', {}).get('dropped')}")
    checks = {
        "zero errors": errors == 0,
        "a ledger row per request": rows[0] == sent,
        f"RSS flat within ±{TOLERANCE:.0%} after warm-up": flat,
    }
    for what, ok in checks.items():
        say(f"{'ok  ' if ok else 'FAIL'} {what}")
    verdict = all(checks.values())
    say(f"verdict: {'PASS' if verdict else 'FAIL'}")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
