"""The `rlhf` command: one subcommand per stage, plus `data` (demo, import, validate).

DVC stages and Kubeflow components call the same stage functions this file calls; it only parses arguments, loads
the params, and writes the metrics and plot files that DVC reads.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from rlhf.config import ConfigError, Params, load_params
from rlhf.data.io import DataError

STAGES = ("pretrain", "sft", "reward", "ppo")


def _offline_friendly_environment() -> None:
    # Telemetry would try the network on every run; users can still opt in by setting these themselves.
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def _add_params_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param; repeatable (e.g. --set sft.learning_rate=1e-4)",
    )


def _stage_runner(stage: str) -> Callable[[Params], object]:
    from rlhf.stages import ppo, pretrain, reward, sft

    modules = {"pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo}
    return lambda params: modules[stage].run(getattr(params, stage))


def _cmd_stage(args: argparse.Namespace) -> None:
    from rlhf.storage import write_json
    from rlhf.tracking import is_main_process

    params = load_params(args.params, args.overrides)
    result = _stage_runner(args.command)(params)
    if not is_main_process():  # under `accelerate launch`, rank 0 writes the files DVC reads
        return
    metrics_file = args.metrics or f"metrics/{args.command}.json"
    write_json(metrics_file, result.metrics)
    plots_dir = args.plots or f"plots/{args.command}"
    # One series per file, every row with the same keys: DVC drops plot files whose rows differ.
    for name, key in result.curves:
        series = [{"step": row["step"], key: row[key]} for row in result.history if key in row]
        write_json(f"{plots_dir}/{name}.json", series)
    print(f"{args.command}: " + ", ".join(f"{key}={value:.4g}" for key, value in result.metrics.items()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from rlhf.data.demo import generate

    params = load_params(args.params, args.overrides)
    counts = generate(params.demo, args.output)
    for name, count in counts.items():
        print(f"{args.output.rstrip('/')}/{name}: {count} rows")


def _cmd_import(args: argparse.Namespace) -> None:
    from rlhf import tracking
    from rlhf.data.importers import import_alpaca, import_hh_rlhf

    importer = {"hh-rlhf": import_hh_rlhf, "alpaca": import_alpaca}[args.format]
    report = importer(args.source, args.output)
    print(report.summary())
    if not args.no_track:
        with tracking.stage_run(f"import-{args.format}", {"source": args.source, "output": args.output}):
            details = report.to_dict()
            tracking.log_metrics(
                {"rows_read": details["total"], "rows_kept": details["kept"]}
                | {f"rows_dropped.{reason}": count for reason, count in details["dropped"].items()}
            )
            import mlflow

            mlflow.log_dict(details, "import_report.json")


def _cmd_validate(args: argparse.Namespace) -> None:
    from rlhf.data.formats import validate
    from rlhf.data.io import fingerprint, read_rows

    rows = read_rows(args.file)
    validate(rows, args.kind)
    print(f"{args.file}: {len(rows)} valid {args.kind} records, fingerprint {fingerprint(rows.records)[:16]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline: pretrain, SFT, reward model, PPO.")
    commands = parser.add_subparsers(dest="command", required=True)

    for stage in STAGES:
        stage_parser = commands.add_parser(stage, help=f"run the {stage} stage")
        _add_params_options(stage_parser)
        stage_parser.add_argument("--metrics", help=f"metrics JSON to write (default: metrics/{stage}.json)")
        stage_parser.add_argument("--plots", help=f"folder for loss-curve JSON (default: plots/{stage})")
        stage_parser.set_defaults(handler=_cmd_stage)

    data = commands.add_parser("data", help="demo data, importers and validation")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    demo = data_commands.add_parser("demo", help="write the demo datasets (deterministic)")
    demo.add_argument("-o", "--output", default="data", help="output folder (default: data)")
    _add_params_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    importer = data_commands.add_parser("import", help="convert a public dataset to the pipeline's formats")
    importer.add_argument("format", choices=["hh-rlhf", "alpaca"])
    importer.add_argument("source", help="file or folder of the raw dataset")
    importer.add_argument("-o", "--output", required=True, help="output .jsonl file")
    importer.add_argument("--no-track", action="store_true", help="do not record the import in MLflow")
    importer.set_defaults(handler=_cmd_import)

    validate = data_commands.add_parser("validate", help="check a dataset file against a format")
    validate.add_argument("file")
    validate.add_argument("--kind", required=True, choices=["text", "sft", "preference", "prompts"])
    validate.set_defaults(handler=_cmd_validate)
    return parser


def _exit_on_sigterm() -> None:
    # Kubeflow, DVC and schedulers stop a step with SIGTERM. As an exception it unwinds like Ctrl-C: the MLflow run
    # ends as failed instead of staying RUNNING, and staging folders are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    _offline_friendly_environment()
    _exit_on_sigterm()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
