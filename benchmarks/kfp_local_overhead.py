"""Benchmark: orchestration overhead of the local Kubeflow run of the demo, and its metrics against `dvc repro`'s.

Copies the project's tracked files into a temporary folder and runs `rlhf pipeline run --local` (kfp's local
runner, default params.yaml). Each step records its own compute time from inside its component (RLHF_STEP_TIMINGS:
from the step function's start to its end, model loading included); the overhead is the run's wall time minus the
sum of those: process start-up, kfp's executor, artifact bookkeeping, the exit handler. Target: <= 10% of the run.
If benchmarks/results/demo_pipeline.json (the `dvc repro` benchmark) exists, the held-out metrics are compared.

    python benchmarks/kfp_local_overhead.py [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_pipeline import ROOT, _copy_project  # noqa: E402 - the same clean copy as the DVC benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "kfp_local_overhead.json"))
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")

    with tempfile.TemporaryDirectory(prefix="rlhf-kfp-bench-") as folder:
        project = Path(folder)
        _copy_project(project)
        timings_file = project / "step_timings.jsonl"
        start = time.perf_counter()
        result = subprocess.run(["rlhf", "pipeline", "run", "--local"], cwd=project, capture_output=True, text=True,
                                env=dict(env, RLHF_STEP_TIMINGS=str(timings_file)))
        wall = time.perf_counter() - start
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            return 1
        steps = [json.loads(line) for line in timings_file.read_text().splitlines()]
        run_folder = Path(result.stdout.split("pipeline run: ")[1].splitlines()[0])
        evaluation = json.loads((run_folder / "evaluate" / "metrics").read_text())
        registered = json.loads((run_folder / "register" / "registered").read_text())

    compute = sum(step["seconds"] for step in steps)
    overhead = wall - compute
    checks = {f"orchestration overhead {overhead:.1f} s = {overhead / wall:.1%} of {wall:.0f} s <= 10%":
              overhead <= 0.10 * wall,
              "champion policy registered": "champion" in registered["versions"]["policy"]["outcome"]}
    dvc_results = ROOT / "benchmarks" / "results" / "demo_pipeline.json"
    comparison = {}
    if dvc_results.exists():
        by_dvc = json.loads(dvc_results.read_text()).get("evaluation", {})
        comparison = {key: (by_dvc[key], round(value, 4)) for key, value in evaluation.items() if key in by_dvc}
        worst = max((abs(a - b) for a, b in comparison.values()), default=0.0)
        checks[f"held-out metrics equal dvc repro's (largest difference {worst:.2g} <= 1e-3)"] = worst <= 1e-3

    print(f"{'step':<18}{'seconds':>8}")
    for step in steps:
        print(f"{step['step']:<18}{step['seconds']:>8.1f}")
    print(f"{'sum of steps':<18}{compute:>8.1f}\n{'wall':<18}{wall:>8.1f}\n{'overhead':<18}{overhead:>8.1f}\n")
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")
    output = {
        "benchmark": "rlhf pipeline run --local on the demo (params.yaml)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "wall_seconds": round(wall, 1), "step_seconds": {s["step"]: round(s["seconds"], 1) for s in steps},
        "overhead_seconds": round(overhead, 1), "overhead_fraction": round(overhead / wall, 4),
        "evaluation_vs_dvc": comparison, "checks": checks,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(output, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
