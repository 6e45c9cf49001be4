"""Benchmark: a real pretrained chat model (SmolLM2-135M-Instruct, Llama architecture) through the stages on real
data, with recipes/smollm2-hh.yaml.

Builds the recipe's datasets from HH-RLHF (harmless) and Alpaca (`rlhf data hh-chat`), then runs pretrain (brings the
GGUF base in), SFT, the reward model, PPO and evaluation as `rlhf` commands, and records per stage: wall time, peak
RSS of the stage's process tree (and peak GPU memory on CUDA, from nvidia-smi); training tokens/s of SFT and the
reward model (tokens of the rows as the chat template renders them, x epochs / the trainer's train_runtime);
generation tokens/s (the SFT model sampling the evaluation prompts); the reward model's pairwise accuracy on the
preference pairs it never trained on, with its 95% Wilson interval; and the PPO policy's win rate over SFT by the
reward model on held-out prompts.

    python benchmarks/real_model.py                    # CPU: a slice sized to finish in about an hour; the reward
                                                       # model still trains on every HH-RLHF training pair
    python benchmarks/real_model.py --device cuda      # the full recipe, on one GPU

Writes benchmarks/results/real_model.json (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-hh.yaml"
RLHF = [sys.executable, "-m", "rlhf.cli"]
STAGES = ("pretrain", "sft", "reward", "ppo", "evaluate")

# Dataset sizes and params overrides per device. The GPU profile is the recipe as written.
PROFILES = {
    "cuda": {"data": {"sft_rows": 512, "rl_prompts": 256, "eval_prompts": 128}, "set": {}},
    "cpu": {
        "data": {"sft_rows": 64, "rl_prompts": 32, "eval_prompts": 16},
        "set": {
            "sft.batch_size": 8,
            "sft.max_length": 256,
            # Every training pair, LoRA + bf16 autocast to fit the hour; longer pairs than max_length are dropped.
            "reward.batch_size": 8,
            "reward.max_length": 384,
            "reward.lora.enabled": True,
            "reward.learning_rate": 0.0002,
            "reward.save_steps": 10000,
            "ppo.total_episodes": 16,
            "ppo.rollout_batch_size": 8,
            "ppo.mini_batch_size": 8,
            "ppo.max_new_tokens": 32,
            "ppo.eval_batch_size": 16,
            "evaluate.max_new_tokens": 32,
            "evaluate.batch_size": 16,
        },
    },
}


class PeakMemory:
    """Polls the RSS of a process and its children (and the GPU's used memory) until stopped."""

    def __init__(self, pid: int, gpu: bool) -> None:
        self.pid, self.gpu = pid, gpu
        self.rss = self.gpu_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.rss = max(self.rss, rss / 2**20)
            except psutil.Error:
                pass
            if self.gpu:
                used = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.split()
                if used:
                    self.gpu_mb = max(self.gpu_mb, float(used[0]))
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(stage: str, overrides: list[str], workdir: Path, env: dict[str, str], gpu: bool) -> dict[str, float]:
    started = time.perf_counter()
    with open(workdir / f"{stage}.log", "w") as log:
        process = subprocess.Popen(
            [*RLHF, stage, "--params", "params.yaml", *overrides],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        memory = PeakMemory(process.pid, gpu)
        code = process.wait()
        memory.stop()
    if code != 0:
        tail = (workdir / f"{stage}.log").read_text()[-3000:]
        raise SystemExit(f"{stage} failed (exit {code}):\n{tail}")
    row = {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": round(memory.rss)}
    if gpu:
        row["peak_gpu_mb"] = round(memory.gpu_mb)
    return row


def mlflow_metric(workdir: Path, stage: str, key: str) -> list[float]:
    """Every value of one metric of the stage's newest MLflow run (read straight from the sqlite store)."""
    with sqlite3.connect(workdir / "mlflow.db") as db:
        run = db.execute(
            "select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid where t.key = "
            "'rlhf.stage' and t.value = ? order by r.start_time desc limit 1",
            (stage,),
        ).fetchone()
        rows = db.execute(
            "select value from metrics where run_uuid = ? and key = ? order by step, timestamp", (run[0], key)
        ).fetchall()
    return [value for (value,) in rows]


def training_tokens(params, stage: str, workdir: Path) -> int:
    """Tokens of one epoch of the stage's training rows, rendered as the stage renders them (chat template,
    truncation to max_length for SFT, pairs longer than max_length dropped for the reward model)."""
    from rlhf.chat import preference_rows, sft_rows
    from rlhf.data.formats import load_dataset, split
    from rlhf.modeling import load_tokenizer

    cfg = getattr(params, stage)
    tokenizer = load_tokenizer(str(workdir / (cfg.model if stage == "sft" else cfg.base_model)))

    def length(messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    dataset = load_dataset(str(workdir / cfg.dataset), "sft" if stage == "sft" else "preference")[0]
    train = split(dataset, cfg.eval_fraction, cfg.seed)[0]
    if stage == "sft":
        rows = sft_rows(train, tokenizer)[0]
        texts = (
            [row["prompt"] + row["completion"] for row in rows]
            if "prompt" in rows.column_names
            else list(rows["messages"])
        )
        return sum(min(length(text), cfg.max_length) for text in texts)
    total = 0
    for row in preference_rows(train, tokenizer):
        lengths = [length(row["prompt"] + row[side]) for side in ("chosen", "rejected")]
        total += sum(lengths) if max(lengths) <= cfg.max_length else 0
    return total


def generation_speed(workdir: Path, params, device: str) -> float:
    """New tokens per second of the SFT model sampling the evaluation prompts in batches (KV cache)."""
    import torch

    from rlhf.chat import format_prompt
    from rlhf.data.formats import load_dataset
    from rlhf.modeling import load_causal_lm, load_tokenizer, stop_token_ids
    from rlhf.sampling import generate, with_model_sampling

    cfg = params.evaluate
    tokenizer = load_tokenizer(str(workdir / cfg.sft_model))
    tokenizer.padding_side = "left"
    model = load_causal_lm(str(workdir / cfg.sft_model), tokenizer, dtype="auto").to(device).eval()
    prompts = load_dataset(str(workdir / cfg.eval_prompts), "prompts")[0]["prompt"]
    sampling = with_model_sampling(cfg, model)
    queries = [format_prompt(prompt, tokenizer) for prompt in prompts]
    torch.manual_seed(0)
    generate(model, tokenizer, queries[:2], sampling, device)  # warm-up
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(queries), cfg.batch_size):
        samples = generate(
            model,
            tokenizer,
            queries[start : start + cfg.batch_size],
            sampling,
            device,
            stop_token_ids(model, tokenizer),
        )
        tokens += int(samples.mask.sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def wilson(proportion: float, n: float, z: float = 1.96) -> list[float]:
    centre = proportion + z * z / (2 * n)
    spread = z * (proportion * (1 - proportion) / n + z * z / (4 * n * n)) ** 0.5
    return [round((centre - spread) / (1 + z * z / n), 4), round((centre + spread) / (1 + z * z / n), 4)]


def machine(device: str) -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    text = f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "datasets",
        help="folder holding hh-rlhf-harmless/ and alpaca/ (default ../shared/datasets)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "real_model.json")
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    profile = PROFILES[args.device]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-real-model-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""

    (workdir / "params.yaml").write_text(RECIPE.read_text())
    sizes = profile["data"]
    subprocess.run(
        [
            *RLHF,
            "data",
            "hh-chat",
            str(args.data / "hh-rlhf-harmless" / "sample.jsonl.gz"),
            "--alpaca",
            str(args.data / "alpaca" / "sample.json"),
            "-o",
            "data/hh-chat",
            *[f"--{key.replace('_', '-')}={value}" for key, value in sizes.items()],
        ],
        cwd=workdir,
        env=env,
        check=True,
    )
    overrides = [f"--set={key}={value}" for key, value in profile["set"].items()]
    from rlhf.config import load_params

    params = load_params(workdir / "params.yaml", [item.removeprefix("--set=") for item in overrides])

    stages: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        print(f"running {stage} ...", flush=True)
        stages[stage] = run_stage(stage, overrides, workdir, env, args.device == "cuda")
        print(f"  {stages[stage]}", flush=True)
    metrics = {stage: json.loads((workdir / "metrics" / f"{stage}.json").read_text()) for stage in STAGES}

    throughput = {}
    for stage in ("sft", "reward"):
        runtime = mlflow_metric(workdir, stage, "train_runtime")[-1]
        epochs = getattr(params, stage).epochs
        throughput[stage] = round(training_tokens(params, stage, workdir) * epochs / runtime, 1)
    ppo_speed = mlflow_metric(workdir, "ppo", "tokens_per_second")
    evaluation = metrics["evaluate"]
    result = {
        "machine": machine(args.device),
        "device": args.device,
        "model": params.pretrain.base_model,
        "data": {**sizes, "preference_pairs_held_out": evaluation["rm_pairs"]},
        "params_overrides": profile["set"],
        "stages": stages,
        "training_tokens_per_s": throughput,
        "ppo_tokens_per_s": round(sum(ppo_speed) / len(ppo_speed), 1),
        "generation_tokens_per_s": round(generation_speed(workdir, params, args.device), 1),
        "reward_model": {
            "held_out_accuracy": round(evaluation["rm_accuracy"], 4),
            "held_out_pairs": int(evaluation["rm_pairs"]),
            "ci95": wilson(evaluation["rm_accuracy"], evaluation["rm_pairs"]),
            "trainer_eval_accuracy": round(metrics["reward"]["eval_accuracy"], 4),
            "trainer_eval_pairs": int(metrics["reward"]["eval_pairs"]),
            "train_pairs_used": int(metrics["reward"]["train_examples_used"]),
        },
        "policy": {
            "win_rate_rm_over_sft": round(evaluation["win_rate/rm"], 4),
            "prompts": int(evaluation["prompts"]),
            "ci95": wilson(evaluation["win_rate/rm"], evaluation["prompts"]),
            "rm_gain_in_sft_std": round(evaluation["rm_gain_in_sft_std"], 4),
            "kl": round(evaluation["policy/kl"], 4),
            "eos_rate": round(evaluation["policy/eos_rate"], 4),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['machine']}, device {args.device}")
    print("| stage | wall s | peak RSS MB |" + (" peak GPU MB |" if args.device == "cuda" else ""))
    for stage, row in stages.items():
        gpu = f" {row['peak_gpu_mb']} |" if args.device == "cuda" else ""
        print(f"| {stage} | {row['wall_s']} | {row['peak_rss_mb']} |{gpu}")
    reward = result["reward_model"]
    print(
        f"training tokens/s: SFT {throughput['sft']}, reward {throughput['reward']}; PPO {result['ppo_tokens_per_s']};"
        f" generation {result['generation_tokens_per_s']}"
    )
    print(
        f"reward model held-out accuracy {reward['held_out_accuracy']:.3f} on {reward['held_out_pairs']} pairs, "
        f"95% CI {reward['ci95']}"
    )
    print(
        f"policy win rate over SFT (RM) {result['policy']['win_rate_rm_over_sft']:.3f} on "
        f"{result['policy']['prompts']} prompts, 95% CI {result['policy']['ci95']}"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
