"""Benchmark: wall time of `dvc repro` for pretrain -> sft -> reward on the demo, from a clean copy of the project.

Copies the project's tracked files into a temporary folder, regenerates the demo data, and times `dvc repro -s` of
each stage in order (so the numbers are the stages as DVC runs them, interpreter start-up included). Prints a table,
writes JSON (default benchmarks/results/supervised_stages.json) and exits non-zero if the total exceeds the target.

    python benchmarks/supervised_stages.py [--target-seconds 360] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "reward")


def _run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _copy_project(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    _run(["git", "init", "-q"], destination)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-seconds", type=float, default=360.0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "supervised_stages.json"))
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as folder:
        project = Path(folder)
        _copy_project(project)
        _run(["rlhf", "data", "demo", "-o", "data"], project)
        timings = {}
        for stage in STAGES:
            start = time.perf_counter()
            _run(["dvc", "repro", "-s", stage], project)
            timings[stage] = time.perf_counter() - start
        metrics = {stage: json.loads((project / "metrics" / f"{stage}.json").read_text()) for stage in STAGES}

    total = sum(timings.values())
    result = {
        "benchmark": "dvc repro pretrain -> sft -> reward (demo params)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "seconds": {stage: round(value, 1) for stage, value in timings.items()} | {"total": round(total, 1)},
        "target_seconds": args.target_seconds,
        "reward_eval_accuracy": metrics["reward"]["eval_accuracy"],
        "sft_eval_perplexity": round(metrics["sft"]["eval_perplexity"], 3),
    }
    print(f"{'stage':<10}{'seconds':>10}")
    for stage in STAGES:
        print(f"{stage:<10}{timings[stage]:>10.1f}")
    print(f"{'total':<10}{total:>10.1f}   (target <= {args.target_seconds:.0f} s)")
    print(f"reward held-out accuracy {result['reward_eval_accuracy']:.3f}, SFT eval perplexity "
          f"{result['sft_eval_perplexity']}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if total <= args.target_seconds else 1


if __name__ == "__main__":
    raise SystemExit(main())
