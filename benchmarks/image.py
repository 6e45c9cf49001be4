"""Benchmark: the project's image, each variant built with `rlhf image build` from a cold layer cache for the
project (the base image is kept), and its size.

    python benchmarks/image.py                                   # CPU variant, python:3.11-slim base
    python benchmarks/image.py --variant cpu --variant cuda --debian-base --host-pip   # no registry reachable

Writes benchmarks/results/image.json (or --output) and prints one line per variant. Sizes are what the engine
reports (`image inspect`, uncompressed); the build time counts downloads, so it depends on the network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

from rlhf import image

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=("cpu", "cuda"))
    parser.add_argument("--debian-base", action="store_true")
    parser.add_argument("--host-pip", action="store_true")
    parser.add_argument("--engine", choices=("podman", "docker"))
    parser.add_argument("--keep-cache", action="store_true", help="reuse cached layers (time a rebuild)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "image.json"))
    args = parser.parse_args()
    tool = image.engine(args.engine)

    results = []
    for variant in args.variant or ["cpu"]:
        if not args.keep_cache:
            # Dangling layers are the build cache of earlier builds; the base image stays.
            subprocess.run([tool, "rmi", "--force", image.default_tag(ROOT, variant)], capture_output=True)
            subprocess.run([tool, "image", "prune", "--force"], capture_output=True)
        built = image.build(ROOT, variant, tool=tool, use_host_pip=args.host_pip, debian=args.debian_base)
        results.append(
            {
                "variant": variant,
                "image": built.image,
                "size_gb": round(built.size_bytes / 1e9, 2),
                "build_seconds": round(built.seconds),
            }
        )
        print(f"{variant}: {built.size_bytes / 1e9:.2f} GB, built in {built.seconds:.0f} s ({built.image})")

    record = {
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
        "engine_version": _version(tool),
        "engine": tool,
        "base": image.DEBIAN_BASE if args.debian_base else "python:3.11-slim",
        "host_pip": args.host_pip,
        "cold_cache": not args.keep_cache,
        "variants": results,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
