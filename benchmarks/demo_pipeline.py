"""Benchmark: the demo through `dvc repro`, stage by stage, from a clean copy of the project, with its targets.

Copies the project's tracked files into a temporary folder, regenerates the demo data, and times `dvc repro -s` of
each stage in order (the stages as DVC runs them, interpreter start-up included). Checks the targets: pretrain + sft +
reward <= 6 min and reward held-out accuracy >= 0.85; PPO <= 5 min and, on the held-out prompts, the policy's reward-
model score above the SFT model's by >= 1 SFT standard deviation, gold (VADER) score +0.3, KL within the budget and
>= 90% of responses ending with EOS; then evaluate, both gates and register run and a champion policy is registered.
Prints a table, writes JSON, exits non-zero if a target is missed.

    python benchmarks/demo_pipeline.py [--output FILE]
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

import yaml

from rlhf.stages import STEPS

ROOT = Path(__file__).resolve().parents[1]
STAGES = tuple(step.name for step in STEPS if step.kind != "data")  # dvc.yaml's stages, in order
METRICS = ("pretrain", "sft", "reward", "ppo", "evaluate")


def _run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _copy_project(destination: Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    _run(["git", "init", "-q"], destination)


def _checks(timings: dict[str, float], metrics: dict[str, dict[str, float]], kl_budget: float) -> dict[str, bool]:
    supervised = timings["pretrain"] + timings["sft"] + timings["reward"]
    ppo = metrics["ppo"]
    return {
        f"pretrain+sft+reward {supervised:.0f} s <= 360 s": supervised <= 360,
        f"reward held-out accuracy {metrics['reward']['eval_accuracy']:.3f} >= 0.85":
            metrics["reward"]["eval_accuracy"] >= 0.85,
        f"ppo {timings['ppo']:.0f} s <= 300 s": timings["ppo"] <= 300,
        f"RM score gain {ppo['eval/rm_gain_in_sft_std']:.2f} SFT std >= 1": ppo["eval/rm_gain_in_sft_std"] >= 1,
        f"gold score gain {ppo['eval/gold_gain']:+.3f} >= 0.3": ppo["eval/gold_gain"] >= 0.3,
        f"final objective/kl {ppo['objective/kl']:.2f} <= budget {kl_budget}": ppo["objective/kl"] <= kl_budget,
        f"held-out EOS rate {ppo['eval/policy/eos_rate']:.3f} >= 0.9": ppo["eval/policy/eos_rate"] >= 0.9,
        f"both gates passed, champion rlhf-policy v{metrics['registry']['versions']['policy']['version']} registered":
            metrics["registry"]["gates_passed"] and "champion" in metrics["registry"]["versions"]["policy"]["outcome"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "demo_pipeline.json"))
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
        metrics = {stage: json.loads((project / "metrics" / f"{stage}.json").read_text()) for stage in METRICS}
        metrics["registry"] = json.loads((project / "registry" / "registered.json").read_text())
        kl_budget = yaml.safe_load((project / "params.yaml").read_text())["ppo"]["kl_budget"]

    checks = _checks(timings, metrics, kl_budget)
    ppo = metrics["ppo"]
    result = {
        "benchmark": "dvc repro of the demo, stage by stage (params.yaml)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "seconds": {stage: round(value, 1) for stage, value in timings.items()},
        "held_out": {key: round(value, 4) for key, value in ppo.items() if key.startswith("eval/")},
        "reward_eval_accuracy": metrics["reward"]["eval_accuracy"],
        "evaluation": {key: round(value, 4) for key, value in metrics["evaluate"].items()},
        "checks": checks,
    }
    print(f"{'stage':<16}{'seconds':>8}")
    for stage in STAGES:
        print(f"{stage:<16}{timings[stage]:>8.1f}")
    print(f"\nheld-out prompts    {'SFT':>8} {'PPO':>8}")
    for name in ("rm_score", "rm_score_std", "gold_score", "kl", "eos_rate", "length"):
        print(f"{name:<20}{ppo[f'eval/sft/{name}']:>8.3f} {ppo[f'eval/policy/{name}']:>8.3f}")
    evaluation = metrics["evaluate"]
    print(f"win rate of PPO over SFT: {evaluation['win_rate/rm']:.3f} (reward model), "
          f"{evaluation['win_rate/gold']:.3f} (gold); RM pairwise accuracy {evaluation['rm_accuracy']:.3f}")
    print()
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
