"""The local pipeline run's console: kfp's local runner re-prints every line a step writes,
with its orchestration log around it; `PipelineConsole` keeps a line per step, the progress of the long loops,
warnings and errors."""

from __future__ import annotations

import io
import json

from rlhf.console import PROGRESS_MARK, PipelineConsole

EXECUTOR_INPUT = json.dumps({"inputs": {"parameterValues": {"demo": {"seed": 1234.0}}}}, indent=4).splitlines()


def step_output(task: str, *lines: str, status: str = "SUCCESS") -> list[str]:
    """What kfp's local runner prints for one task: its log, the step's own lines indented by four spaces."""
    return [
        f"15:42:09.352 - INFO - Executing task \x1b[96m'{task}'\x1b[0m",
        "15:42:09.352 - INFO - Streamed logs:",
        "",
        f"    [KFP Executor 2026-12-02 15:42:09,473 INFO]: Looking for component `{task}` in --component_module_path x",
        "    [KFP Executor 2026-12-02 15:42:09,474 INFO]: Got executor_input:",
        *("    " + line for line in EXECUTOR_INPUT),
        "    2026/12/02 15:42:14 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
        *("    " + line for line in lines),
        "    [KFP Executor 2026-12-02 15:42:18,543 INFO]: Wrote executor output file to /x/executor_output.json.",
        "    ",
        "",
        f"15:42:19.994 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m",
        f"15:42:19.995 - INFO - Task \x1b[96m'{task}'\x1b[0m outputs:",
        "    model: Model( name='model',",
        "                  uri='/x/kfp-local/run/pretrain/model',",
        "                  metadata={} )",
        "-" * 80,
    ]


def progress(loop: str, step: int, total: int, **values: float) -> str:
    return PROGRESS_MARK + json.dumps({"loop": loop, "step": step, "total": total, "values": values})


def shown(lines: list[str], tty: bool) -> str:
    out = io.StringIO()
    console = PipelineConsole(out, tty=tty)
    for line in lines:  # kfp prints the indentation and the line in separate writes
        console.write(line[:4])
        console.write(line[4:] + "\n")
    console.close_bar()
    return out.getvalue()


TRAINING = [progress("pretrain", step, 200, loss=2.0 - step / 200) for step in range(10, 201, 10)]


def test_a_step_is_one_line_and_its_progress_a_line_per_quarter_off_a_terminal() -> None:
    lines = step_output("data") + step_output("pretrain", *TRAINING)
    assert shown(lines, tty=False).splitlines() == [
        "data: done (0 s)",
        "  pretrain  25% 50/200  loss 1.75",
        "  pretrain  50% 100/200  loss 1.5",
        "  pretrain  75% 150/200  loss 1.25",
        "  pretrain 100% 200/200  loss 1",
        "pretrain: done (0 s)",
    ]


def test_on_a_terminal_progress_is_redrawn_in_place() -> None:
    text = shown(step_output("pretrain", *TRAINING), tty=True)
    assert text.count("\r") == len(TRAINING)  # every record redraws the one line
    assert text.count("\n") == 2  # the finished bar, then the step's line
    assert text.endswith("\r  pretrain 100% 200/200  loss 1\x1b[K\npretrain: done (0 s)\n")


def test_warnings_errors_and_tracebacks_still_show() -> None:
    warning = "/venv/lib/python3.11/site-packages/lib/x.py:10: UserWarning: something of theirs"
    traceback = [
        "Traceback (most recent call last):",
        '  File "/x/stage.py", line 3, in run',
        "rlhf.data.io.DataError: data/sft.jsonl:7: not valid JSON",
    ]
    lines = step_output("sft", warning, "  warnings.warn(", *traceback, status="FAILURE")
    lines.insert(-1, "15:42:20.000 - ERROR - Pipeline 'rlhf-pipeline' finished with status FAILURE")
    assert shown(lines, tty=False).splitlines() == [
        warning,
        "  warnings.warn(",
        *traceback,
        "sft: FAILURE (0 s)",
        "Pipeline 'rlhf-pipeline' finished with status FAILURE",
    ]


def test_mlflows_registry_notes_give_way_to_the_register_steps_own_line() -> None:
    lines = step_output(
        "register",
        "Successfully registered model 'rlhf-sft'.",
        "Created version '1' of model 'rlhf-sft'.",
        "rlhf-sft v1: new version; champion (no champion yet)",
    )
    assert shown(lines, tty=False).splitlines() == [
        "rlhf-sft v1: new version; champion (no champion yet)",
        "register: done (0 s)",
    ]


def test_a_warning_of_the_step_logged_through_kfps_executor_shows_without_its_prefix() -> None:
    lines = step_output("ppo", "[KFP Executor 2026-12-02 15:45:58,178 WARNING]: [RANK 0] a checkpoint was not saved")
    assert "[RANK 0] a checkpoint was not saved" in shown(lines, tty=False).splitlines()
