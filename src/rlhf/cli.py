"""The `rlhf` command: one subcommand per stage, `gate`, the registry (register, promote, rollback, lineage) and
`data` (demo, import, validate).

DVC stages and Kubeflow components call the same stage functions this file calls; it only parses arguments, loads
the params, and writes the metrics and plot files that DVC reads.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf.config import ConfigError, load_params
from rlhf.data.io import DataError
from rlhf.steps import GATES, ROLES, STAGES, STEPS, step

# The params sections a pipeline run reads (the data step's `demo` only for the demo data, which has its own).
PIPELINE_SECTIONS = tuple(dict.fromkeys(step.section for step in STEPS if step.kind != "data"))


def _offline_friendly_environment() -> None:
    # Telemetry would try the network on every run; users can still opt in by setting these themselves. MLflow's
    # INFO lines (creating the database's tables, "View run" links) would bury the command's own output and errors.
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
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
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="let the built-in defaults stand in for a missing or empty params file or a missing "
        "section (without it, those are errors)",
    )


def _params(args: argparse.Namespace, *sections: str):
    """The params a command reads: the file, its overrides, and the sections the command needs."""
    return load_params(args.params, args.overrides, sections=sections, defaults=args.defaults)


def _cmd_stage(args: argparse.Namespace) -> None:
    from rlhf.stages.dispatch import run_stage
    from rlhf.storage import write_json
    from rlhf.tracking import is_main_process, require_store

    stage = step(args.command)
    loaded = _params(args, stage.section)
    if is_main_process():
        require_store()  # a tracking store that cannot be used fails now: not after the models have loaded
    result = run_stage(stage.name, getattr(loaded, stage.section))
    if not is_main_process():  # under `accelerate launch`, rank 0 writes the files DVC reads
        return
    metrics_file = args.metrics or f"metrics/{args.command}.json"
    write_json(metrics_file, result.metrics)
    # The few that `dvc metrics show` lists, so its table fits a terminal (one column per metric).
    headline = {key: result.metrics[key] for key in stage.headline if key in result.metrics}
    folder, name = posixpath.split(metrics_file)
    write_json(posixpath.join(folder, "headline", name), headline)
    plots_dir = args.plots or f"plots/{args.command}"
    # One series per file, every row with the same keys: DVC drops plot files whose rows differ.
    for name, key in result.curves:
        series = [{"step": row["step"], key: row[key]} for row in result.history if key in row]
        write_json(f"{plots_dir}/{name}.json", series)
    print(f"{args.command}: " + ", ".join(f"{key}={value:.4g}" for key, value in result.metrics.items()))


class GateFailed(Exception):
    """A gate did not pass: the command exits 1, so DVC runs nothing downstream."""


def _cmd_gate(args: argparse.Namespace) -> None:
    from rlhf.gates import describe, evaluate_gate, failure_message

    verdict = evaluate_gate(args.gate, _params(args, "gates").gates)
    print(f"gate {args.gate}: {'passed' if verdict['passed'] else 'FAILED'}")
    print("\n".join(describe(verdict)))
    if not verdict["passed"]:
        raise GateFailed(failure_message(verdict))


def _cmd_register(args: argparse.Namespace) -> None:
    from rlhf.registry import register

    register(_params(args, "registry").registry)


def _cmd_promote(args: argparse.Namespace) -> None:
    from rlhf.registry import promote

    print(promote(args.model, args.version, args.alias, args.force))


def _cmd_rollback(args: argparse.Namespace) -> None:
    from rlhf.registry import rollback

    print(rollback(args.model))


def _cmd_lineage(args: argparse.Namespace) -> None:
    import json

    from rlhf.registry import format_lineage, lineage

    node = lineage(args.uri)
    print(json.dumps(node, indent=2) if args.json else "\n".join(format_lineage(node)))


def _cmd_pipeline(args: argparse.Namespace) -> None:
    from rlhf.pipelines import rlhf_pipeline, run

    if args.pipeline_command == "export":
        from rlhf.storage import project_root

        root = project_root()
        for path in rlhf_pipeline.export(root, Path(args.output_dir) if args.output_dir else root):
            print(f"wrote {path}")
        return
    params = _params(args, *PIPELINE_SECTIONS)
    if getattr(args, "allow_local_tracking", False):
        params = params.model_copy(
            update={"kubeflow": params.kubeflow.model_copy(update={"allow_local_tracking": True})}
        )
    if args.pipeline_command == "compile":
        for warning in rlhf_pipeline.compile_pipeline(params, args.output):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {args.output}")
    elif args.pipeline_command == "submit":
        for warning in rlhf_pipeline.check_cluster_settings(params.kubeflow):
            print(f"warning: {warning}", file=sys.stderr)
        print(run.submit(params, args.host, args.experiment, args.namespace, args.run_name))
    else:
        image = None
        if args.runner == "docker":
            from rlhf.image import checkout, current

            image = current(checkout(), args.image, args.engine)
        elif args.image:
            raise ConfigError("pipeline run: --image needs --runner docker")
        result = run.run_local(params, args.root, image=image, verbose=args.verbose)
        print("\n".join(_run_summary(result)))
        failed = [verdict for verdict in result["verdicts"].values() if verdict and not verdict["passed"]]
        if failed:
            from rlhf.gates import failure_message

            raise GateFailed(failure_message(failed[0]))


def _run_summary(result: dict) -> list[str]:
    """The end of a local pipeline run: where its outputs are, the gates, the versions and how to look at them."""
    from rlhf.tracking import tracking_uri

    lines = ["", f"pipeline run: {result['run_folder']}"]
    lines += [
        f"gate {gate}: {'passed' if verdict['passed'] else 'FAILED'}"
        for gate, verdict in result["verdicts"].items()
        if verdict is not None
    ]
    versions = (result["registered"] or {}).get("versions", {})
    for role in (role for role in ROLES if role in versions):  # upstream first
        version = versions[role]
        lines.append(f"{version['model']} v{version['version']}: {version['outcome']}")
    champions = [
        f"models:/{versions[role]['model']}@champion"
        for role in ROLES
        if role in versions and "champion" in versions[role]["outcome"].split(";")[-1]
    ]
    if champions:
        lines.append("champions: " + ", ".join(champions))
    if result.get("report"):
        lines.append(f"report: {_relative(result['report'])}")
    if result.get("decision"):
        lines.append(f"decision: {_relative(result['decision'])}")
    uri = tracking_uri()
    lines.append(f"MLflow: {uri}")
    mlflow_run = result.get("mlflow_run")
    # The run's page, in MLflow 3's model-training view (its UI opens in the GenAI view by default).
    page = (
        f"/#/experiments/{mlflow_run['experiment_id']}/runs/{mlflow_run['run_id']}?workflowType=machine_learning"
        if mlflow_run
        else ""
    )
    if uri.startswith("sqlite:"):
        mlflow_command = _relative(str(Path(sys.executable).parent / "mlflow"))
        lines.append(
            f"  {mlflow_command} ui --backend-store-uri {_sqlite_uri_here(uri)}  # then open "
            f"http://127.0.0.1:5000{page}"
        )
    elif uri.startswith("http") and page:
        lines.append(f"  {uri.rstrip('/')}{page}")
    return lines


def _relative(path: str) -> str:
    """`path` relative to the working directory when it lies below it (shorter to read and to paste)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _sqlite_uri_here(uri: str) -> str:
    return "sqlite:///" + _relative(uri.removeprefix("sqlite:///"))


def _cmd_image(args: argparse.Namespace) -> None:
    from rlhf import image

    root = image.checkout()
    if root is None:
        raise image.ImageError(
            "rlhf image build needs the project's checkout (its Dockerfile and src/); rlhf runs "
            "from an installed package here"
        )
    built = image.build(
        root, args.variant, args.base, args.tag, args.engine, args.torch_index_url, args.host_pip, args.debian_base
    )
    print(f"built {built.image}: {built.size_bytes / 1e9:.2f} GB, in {built.seconds:.0f} s")
    if args.push:
        image.push(built.image, args.engine)
        print(f"pushed {built.image}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from rlhf.data.demo import generate

    params = _params(args, "demo")
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


def _cmd_hh_chat(args: argparse.Namespace) -> None:
    from rlhf.data.importers import build_hh_chat

    report = build_hh_chat(
        args.source,
        args.output,
        alpaca=args.alpaca,
        sft_rows=args.sft_rows,
        hh_sft_prompts=args.hh_sft_prompts,
        rl_prompts=args.rl_prompts,
        eval_prompts=args.eval_prompts,
        pairs=args.pairs,
        seed=args.seed,
    )
    print(report.summary())


def _cmd_validate(args: argparse.Namespace) -> None:
    from rlhf.data.formats import validate
    from rlhf.data.io import fingerprint, read_rows

    rows = read_rows(args.file)
    validate(rows, args.kind)
    print(f"{args.file}: {len(rows)} valid {args.kind} records, fingerprint {fingerprint(rows.records)[:16]}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="RLHF pipeline: pretrain, SFT, reward model, PPO, evaluation, registry."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    for stage in STAGES:
        stage_parser = commands.add_parser(stage, help=f"run the {stage} stage")
        _add_params_options(stage_parser)
        stage_parser.add_argument(
            "--metrics",
            help=f"metrics JSON to write (default: metrics/{stage}.json); "
            "the headline ones also go to headline/ beside it",
        )
        stage_parser.add_argument("--plots", help=f"folder for loss-curve JSON (default: plots/{stage})")
        stage_parser.set_defaults(handler=_cmd_stage)

    gate = commands.add_parser("gate", help="check a gate's thresholds; exit 1 if it fails")
    gate.add_argument("gate", choices=GATES, help="which gate: " + ", ".join(GATES))
    _add_params_options(gate)
    gate.set_defaults(handler=_cmd_gate)

    register = commands.add_parser("register", help="register the SFT, reward and PPO models in MLflow")
    _add_params_options(register)
    register.set_defaults(handler=_cmd_register)

    promote = commands.add_parser("promote", help="point an alias (default champion) at a model version")
    promote.add_argument("model", help="registered model name, e.g. rlhf-policy")
    promote.add_argument("version", help="the version number to point the alias at")
    promote.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    promote.add_argument("--force", action="store_true", help="promote even if the version's gates failed")
    promote.set_defaults(handler=_cmd_promote)

    rollback = commands.add_parser("rollback", help="make the previous champion the champion again")
    rollback.add_argument("model", help="registered model name, e.g. rlhf-policy")
    rollback.set_defaults(handler=_cmd_rollback)

    lineage = commands.add_parser("lineage", help="trace a model version to its upstream versions, data and code")
    lineage.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    lineage.add_argument("--json", action="store_true", help="print JSON instead of a tree")
    lineage.set_defaults(handler=_cmd_lineage)

    pipeline = commands.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    compile_parser = pipeline_commands.add_parser("compile", help="write the pipeline's IR YAML")
    compile_parser.add_argument(
        "-o", "--output", default="rlhf_pipeline.yaml", help="the IR YAML to write (default: rlhf_pipeline.yaml)"
    )
    export_parser = pipeline_commands.add_parser(
        "export",
        help="compile the committed YAMLs: components/<step>.yaml, pipelines/rlhf_pipeline.yaml (params.yaml) "
        "and pipelines/<recipe>.yaml (recipes/)",
    )
    export_parser.add_argument("--output-dir", help="where components/ and pipelines/ go (default: the checkout)")
    run_parser = pipeline_commands.add_parser(
        "run", help="run the whole DAG here with kfp's local runner (a cluster: `rlhf pipeline submit`)"
    )
    run_parser.add_argument(
        "--local", action="store_true", help="on this machine: what `run` always does (accepted for clarity)"
    )
    run_parser.add_argument("--root", default="kfp-local", help="where task outputs go (default: kfp-local)")
    run_parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print everything kfp's local runner prints: executor inputs, every log line, "
        "progress bars (default: one line per step and the progress of long loops)",
    )
    run_parser.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: each step in this Python (default); docker: each step in the project's "
        "image, through kfp's DockerRunner (podman or docker)",
    )
    run_parser.add_argument(
        "--image", help="with --runner docker: the image (default: the one `rlhf image build` made from this source)"
    )
    run_parser.add_argument(
        "--engine",
        choices=("podman", "docker"),
        help="with --runner docker (default: podman if installed, else docker)",
    )
    submit_parser = pipeline_commands.add_parser("submit", help="submit a run to a Kubeflow Pipelines cluster")
    submit_parser.add_argument(
        "--host", required=True, help="the KFP API endpoint, e.g. https://kubeflow.example/pipeline"
    )
    submit_parser.add_argument("--experiment", help="experiment name (default: kubeflow.experiment)")
    submit_parser.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    submit_parser.add_argument("--run-name", help="run name (default: the pipeline's name and a timestamp)")
    for sub in (compile_parser, run_parser, submit_parser):
        _add_params_options(sub)
    for sub in (compile_parser, submit_parser):
        sub.add_argument(
            "--allow-local-tracking",
            action="store_true",
            help="accept that the steps track to a SQLite file inside each pod (no tracking server)",
        )
    pipeline.set_defaults(handler=_cmd_pipeline)

    image_parser = commands.add_parser("image", help="the project's container image")
    image_commands = image_parser.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser("build", help="build the image with podman or docker, tagged by its source")
    build.add_argument("--variant", choices=("cpu", "cuda"), default="cpu", help="PyTorch build (default: cpu)")
    build.add_argument("--base", help="base image (default: python:3.11-slim); any Debian with python3-venv")
    build.add_argument(
        "--debian-base",
        action="store_true",
        help="make a Debian bookworm base with debootstrap (no registry needed) and build on it",
    )
    build.add_argument(
        "--tag",
        help="also tag it so, e.g. REGISTRY/rlhf-pipeline:1.0 (default: localhost/rlhf-pipeline:VARIANT-SOURCEHASH)",
    )
    build.add_argument(
        "--torch-index-url",
        help="where torch comes from (default: PyTorch's index for the variant; empty: pip's own configuration)",
    )
    build.add_argument(
        "--host-pip",
        action="store_true",
        help="podman: pip in the build uses this machine's pip configuration (mirrors, wheel folders, CA bundle)",
    )
    build.add_argument("--engine", choices=("podman", "docker"), help="default: podman if installed, else docker")
    build.add_argument("--push", action="store_true", help="push the image after building it")
    image_parser.set_defaults(handler=_cmd_image)

    data = commands.add_parser("data", help="demo data, importers and validation")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    demo = data_commands.add_parser("demo", help="write the demo datasets (deterministic)")
    demo.add_argument("-o", "--output", default="data", help="output folder (default: data)")
    _add_params_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    importer = data_commands.add_parser("import", help="convert a public dataset to the pipeline's formats")
    importer.add_argument("format", choices=["hh-rlhf", "alpaca"], help="the raw dataset's format")
    importer.add_argument("source", help="file or folder of the raw dataset")
    importer.add_argument("-o", "--output", required=True, help="output .jsonl file")
    importer.add_argument("--no-track", action="store_true", help="do not record the import in MLflow")
    importer.set_defaults(handler=_cmd_import)

    chat = data_commands.add_parser(
        "hh-chat",
        help="a chat model's datasets from raw HH-RLHF (+ Alpaca for SFT): preferences, SFT, RL and "
        "evaluation prompts, in one folder",
    )
    chat.add_argument("source", help="raw HH-RLHF file or folder ({chosen, rejected} transcripts)")
    chat.add_argument("-o", "--output", required=True, help="output folder (kubeflow.data_source of a recipe)")
    chat.add_argument("--alpaca", help="raw Alpaca file: its rows become SFT conversations")
    chat.add_argument("--sft-rows", type=int, default=512, help="Alpaca rows to keep (default 512)")
    chat.add_argument(
        "--hh-sft-prompts", type=int, default=0, help="HH prompts whose chosen dialogue becomes an SFT row (default 0)"
    )
    chat.add_argument("--rl-prompts", type=int, default=256, help="PPO prompts (default 256)")
    chat.add_argument("--eval-prompts", type=int, default=128, help="held-out evaluation prompts (default 128)")
    chat.add_argument("--pairs", type=int, help="keep the pairs of this many prompts (default: every other prompt)")
    chat.add_argument("--seed", type=int, default=0, help="seed of the prompt split (default 0)")
    chat.set_defaults(handler=_cmd_hh_chat)

    validate = data_commands.add_parser("validate", help="check a dataset file against a format")
    validate.add_argument("file", help="the dataset: a file, a folder of files, an s3:// location or a Hub dataset id")
    validate.add_argument(
        "--kind", required=True, choices=["text", "sft", "preference", "prompts"], help="the format to check it against"
    )
    validate.set_defaults(handler=_cmd_validate)
    return parser


def _exit_on_sigterm() -> None:
    # Kubeflow, DVC and schedulers stop a step with SIGTERM. As an exception it unwinds like Ctrl-C: the MLflow run
    # ends as failed instead of staying RUNNING, and staging folders are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _close_progress_bars() -> None:
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    _offline_friendly_environment()
    _exit_on_sigterm()
    args = build_parser().parse_args(argv)
    from rlhf.image import ImageError
    from rlhf.pipelines.run import PipelineError
    from rlhf.registry import RegistryError
    from rlhf.s3 import StorageError
    from rlhf.tracking import TrackingUnavailable, redact

    def fail(message: str, code: int = 2) -> int:
        # One line, whatever the message quotes (a URI's password never reaches the terminal or a CI log), and the
        # last: a progress bar the failure left open would otherwise redraw itself below it at exit.
        _close_progress_bars()
        print(f"error: {redact(' '.join(str(message).split()))}", file=sys.stderr)
        return code

    try:
        args.handler(args)
    except GateFailed as exc:
        return fail(str(exc), 1)
    except (ConfigError, DataError, RegistryError, PipelineError, StorageError, ImageError, TrackingUnavailable) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        # Outputs are written aside and renamed on success, so an interrupted command leaves none half-written;
        # the MLflow run it had open ended as failed on the way out.
        return fail("interrupted; nothing was half-written (rerun the same command to resume)", 130)
    except Exception as exc:
        message = _service_error(exc)
        if message is None:
            raise
        return fail(message)
    return 0


def _service_error(exc: Exception) -> str | None:
    """One line for a failure of the tracking store, of S3 underneath a library (MLflow's own S3 uploads), or of
    the file system (a full disk, a read-only folder); None for anything else, which keeps its traceback."""
    import re

    module = type(exc).__module__
    if module.startswith(("mlflow", "sqlalchemy")):
        from rlhf.tracking import tracking_uri

        text = " ".join(str(getattr(exc, "message", exc)).split())
        # "API request to URL failed with exception HTTPConnectionPool(...): Max retries exceeded ... (Caused by
        # ResponseError('too many 500 error responses'))": the request and the cause are what matter.
        failed = re.search(r"API request to \S*?(/api/\S+) failed with exception .*Caused by \w+\((.*)\)\)", text)
        if failed:
            text = f"{failed.group(1)} failed: {failed.group(2).strip(chr(34) + chr(39))}"
        # SQLAlchemy's "(sqlite3.OperationalError) attempt to write a readonly database [SQL: ...] (Background...)".
        database = re.search(r"\((?:sqlite3|psycopg2?|pymysql)\.\w+\) (.*?)(?: \[SQL:| \(Background|$)", text)
        if database:
            text = database.group(1)
        return f"MLflow at {tracking_uri()}: {text[:300]}"
    if module.startswith(("botocore", "boto3", "s3transfer")):
        from rlhf.s3 import describe

        return describe(exc, None)
    if isinstance(exc, OSError) and exc.strerror:
        # The path when the OS gave one; transformers and safetensors often leave it out (a full disk while saving).
        return f"{exc.filename}: {exc.strerror}" if exc.filename else f"{exc.strerror} ({type(exc).__name__})"
    return None


if __name__ == "__main__":
    sys.exit(main())
