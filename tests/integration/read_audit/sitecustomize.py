"""Imported by every Python process started with this folder on PYTHONPATH (tests/integration/test_dvc.py's first
`dvc repro`): each `rlhf` command records the files and folders it opens for reading under READS_ROOT, one log per
process (its arguments on the first line), for the test that checks them against the stage's deps in dvc.yaml."""

import os
import sys

_LOG_DIR, _ROOT = os.environ.get("READS_LOG_DIR"), os.environ.get("READS_ROOT")
_log = None


def _record(event: str, args: tuple) -> None:
    global _log
    if event == "open":
        path, mode, flags = args
        reading = ("r" in mode and "+" not in mode) if isinstance(mode, str) else flags & os.O_ACCMODE == os.O_RDONLY
    elif event in ("os.listdir", "os.scandir"):
        path, reading = args[0], True
    else:
        return
    if not reading or not isinstance(path, (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(path))
    if not path.startswith(_ROOT + os.sep) or os.path.basename(sys.argv[0]) != "rlhf":
        return
    if not os.path.exists(path):  # a look for what is not there (MLflow probes for optional folders) reads nothing
        return
    if _log is None:  # opened once, before it is recorded: the hook sees its own open and skips it
        name = os.path.join(_LOG_DIR, f"{os.getpid()}.log")
        _log = open(name, "a", encoding="utf-8")  # noqa: SIM115 (open for the life of the process)
        _log.write(" ".join(sys.argv[1:]) + "\n")
    _log.write(os.path.relpath(path, _ROOT) + "\n")
    _log.flush()


if _LOG_DIR and _ROOT:
    sys.addaudithook(_record)
