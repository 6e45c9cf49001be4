"""What the local pipeline run prints.

kfp's local runner streams every step's stdout and stderr through a pipe and re-prints it line by line, with its
own orchestration log around it: a progress bar redrawn 200 times becomes 200 lines, and each step begins with its
executor input as JSON. So the steps of a local run (RLHF_PROGRESS=lines) draw no bars: they print one progress
record per logged step, and `PipelineConsole`, between kfp and the terminal, keeps what a person reads: one line
per step, the progress of the long loops (redrawn in place on a terminal, a line per quarter otherwise), warnings
and errors. `rlhf pipeline run --local -v` prints everything kfp prints.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from typing import Any, TextIO

PROGRESS_ENV = "RLHF_PROGRESS"
PROGRESS_MARK = "@rlhf-progress "
# A line per quarter of a loop when the console is not a terminal.
QUARTERS = 4

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KFP_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - (INFO|WARNING|ERROR) - (.*)$")
_TASK = re.compile(r"'([\w-]+)'")
_EXECUTOR_LOG = re.compile(r"^\[KFP Executor [\d\- :,]+ (\w+)\]: (.*)$")
_LIBRARY_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO ")
# MLflow's notes on registering, which the register step's own line per version repeats.
_REGISTRY_NOTE = re.compile(r"^(Successfully registered model '|Created version '\d+' of model ')")


def progress_as_lines() -> bool:
    """True in a step of a local pipeline run: progress goes out as records, not as bars."""
    return os.environ.get(PROGRESS_ENV) == "lines"


def quiet_progress_bars() -> None:
    """No bars from the libraries (dataset maps, shard writes, downloads) in a step of a local pipeline run."""
    if not progress_as_lines():
        return
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def report_progress(loop: str, step: int, total: int, **values: float) -> None:
    """One progress record of a long loop (training steps, PPO steps), for the pipeline console to render."""
    record = {
        "loop": loop,
        "step": step,
        "total": total,
        "values": {key: float(value) for key, value in values.items()},
    }
    print(PROGRESS_MARK + json.dumps(record), flush=True)


def trainer_progress(loop: str):
    """A transformers callback that reports each logged training step as a progress record."""
    from transformers import TrainerCallback

    class ProgressRecords(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                shown = {
                    key: value
                    for key, value in (logs or {}).items()
                    if key in ("loss", "eval_loss", "eval_accuracy") and isinstance(value, (int, float))
                }
                report_progress(loop, state.global_step, state.max_steps, **shown)

    return ProgressRecords()


def _format(record: dict[str, Any]) -> str:
    step, total = record["step"], record["total"]
    values = "  ".join(f"{key} {value:.4g}" for key, value in record["values"].items())
    percent = f"{100 * step / total:3.0f}%" if total else "    "
    return f"  {record['loop']:<8} {percent} {step}/{total}  {values}".rstrip()


class PipelineConsole(io.TextIOBase):
    """A text stream for kfp's local runner to print into; what reaches `out` is described in the module's doc."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._pending = ""
        self._skipping_json = False
        self._skipping_outputs = False
        self._open_bar = False  # a progress line drawn in place, not yet ended
        self._quarters: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close_bar(self) -> None:
        if self._open_bar:
            self.out.write("\n")
            self._open_bar = False

    def _print(self, text: str) -> None:
        self.close_bar()
        self.out.write(text + "\n")
        self.out.flush()

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        # Step output arrives indented by four spaces.
        text = line[4:] if line.startswith("    ") else line
        if self._skipping_json:
            self._skipping_json = text != "}"
            return
        kfp_log = _KFP_LOG.match(line)
        if kfp_log:
            self._skipping_outputs = False
            self._kfp_log(kfp_log.group(1), kfp_log.group(2))
            return
        if self._skipping_outputs and line.startswith(" "):
            return
        self._skipping_outputs = False
        executor_log = _EXECUTOR_LOG.match(text)
        if executor_log:  # the step's own logging, through kfp's executor: its warnings and errors show
            self._skipping_json = text.endswith("Got executor_input:")
            if executor_log.group(1) != "INFO":
                self._print(executor_log.group(2))
            return
        if text.startswith(PROGRESS_MARK):
            self._progress(json.loads(text[len(PROGRESS_MARK) :]))
            return
        if not text.strip() or set(text.strip()) == {"-"} or _LIBRARY_INFO.match(text) or _REGISTRY_NOTE.match(text):
            return
        self._print(text.rstrip())

    def _kfp_log(self, level: str, message: str) -> None:
        task = _TASK.search(message)
        name = task.group(1) if task else ""
        if message.startswith("Executing task"):
            self._started[name] = time.monotonic()
        elif message.startswith(f"Task '{name}' finished with status"):
            seconds = time.monotonic() - self._started.get(name, time.monotonic())
            status = message.rsplit(" ", 1)[-1]
            self._print(f"{name}: {'done' if status == 'SUCCESS' else status} ({seconds:.0f} s)")
        elif message.startswith(f"Task '{name}' outputs:"):
            self._skipping_outputs = True
        elif level != "INFO":
            self._print(message)

    def _progress(self, record: dict[str, Any]) -> None:
        if self.tty:
            self.out.write("\r" + _format(record)[:200] + "\x1b[K")
            self.out.flush()
            self._open_bar = True
            return
        # Not a terminal: a line when the loop passes each quarter of its length (the last at its end).
        total = max(record["total"], 1)
        quarter = min(QUARTERS, QUARTERS * record["step"] // total)
        if quarter > self._quarters.get(record["loop"], 0):
            self._quarters[record["loop"]] = quarter
            self._print(_format(record))
