"""Where stages read and write: local paths and `s3://` locations, with atomic outputs.

Outputs are atomic: a stage writes into a temporary sibling and renames it into place only on success, so a crash, a
bad input or Ctrl-C never leaves a half-written model, dataset or metrics file behind. An `s3://` output is staged
locally and uploaded on success; its manifest, written last, commits it (`rlhf.s3`).

Inputs at `s3://` are downloaded once into a local cache (`RLHF_CACHE_DIR`, default `~/.cache/rlhf`) and again only
when the object or folder changed; `fetch` gives the local path every loader then reads.

Checkpoints live under `checkpoints/` in the project, or under `RLHF_CHECKPOINT_DIR`. When that is an `s3://` prefix,
each completed checkpoint is mirrored there, so a run on a new machine (a rescheduled pod) resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf import s3

CACHE_ENV = "RLHF_CACHE_DIR"
CHECKPOINTS_ENV = "RLHF_CHECKPOINT_DIR"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder next to `target`; on success it replaces `target`, on error it is removed.

    For an `s3://` target the folder is uploaded on success (manifest last) and removed either way."""
    if s3.is_s3(target):
        with scratch_dir() as staging:
            yield staging
            s3.upload_folder(staging, str(target))
        return
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise _not_written(target, exc) from exc
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folders are private to their owner
        if target.exists():
            # Move the old output aside first so that the swap leaves either the old or the new folder, never neither.
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _not_written(target, exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _not_written(target: Path, exc: OSError) -> s3.StorageError:
    """One line naming the output: the OS names the staging path or none at all (savers often leave it out), or
    a parent that is in the way."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        reason = f"{exc.filename} is a file, where a folder is needed"
    elif exc.filename and not str(exc.filename).startswith(str(target.parent / f".{target.name}.")):
        reason = f"{exc.filename}: {reason}"
    kept = "; the previous contents are unchanged" if target.exists() else ""
    return s3.StorageError(f"{target}: not written ({reason}){kept}")


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Opens a temporary file next to `target` and renames it over `target` once the block succeeds (uploads it, for
    an `s3://` target)."""
    if s3.is_s3(target):
        with scratch_dir() as folder:
            staging = folder / s3.split(str(target))[1].rsplit("/", 1)[-1]
            with open(staging, mode, encoding=None if "b" in mode else "utf-8") as handle:
                yield handle
            s3.upload_file(staging, str(target))
        return
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as exc:
        raise _not_written(target, exc) from exc
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        # mkstemp creates files readable by their owner only; give the result the usual permissions.
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, target)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise _not_written(target, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def write_json(target: str | Path, payload: Any) -> None:
    with atomic_file(target) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="rlhf-") as folder:
        yield Path(folder)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf")


def lock(path: Path):
    """A file lock beside `path`, so that processes sharing the cache fill it once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")


def fetch(location: str | Path) -> str:
    """A local path for `location`: the location itself, unless it is `s3://`; then a verified copy in the cache.

    An object is a file; otherwise the location is a folder (a model, a dataset folder). The cached copy is reused
    while the object's ETag, or the folder's manifest or listing, is unchanged. Processes share the cache safely.
    """
    if not s3.is_s3(location):
        return str(location)
    uri = str(location)
    bucket, key = s3.split(uri)
    cached = cache_root() / "s3" / bucket / (key or "_bucket")
    # What the cached copy was made from, kept beside it: inside, it would become part of the model folder.
    source_file = cached.with_name(f".{cached.name}.source.json")
    with lock(cached):
        recorded = json.loads(source_file.read_text()) if source_file.is_file() and cached.exists() else None
        info = s3.head(uri) if key else None
        if info is not None:
            if recorded != info:
                s3.download_file(uri, cached, info)
            source = info
        else:
            source = s3.folder_manifest(uri)
            if recorded != source:
                with atomic_dir(cached) as staging:
                    s3.download_folder(uri, staging, source)
        if recorded != source:
            write_json(source_file, source)
    return str(cached)


def project_root() -> Path:
    """The nearest folder up from the working directory holding dvc.yaml or .git; else the working directory."""
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return cwd


# -- checkpoints ----------------------------------------------------------------------------------------------------


def checkpoints_root() -> Path:
    """The local folder for checkpoints: RLHF_CHECKPOINT_DIR when that is a local path, else <project>/checkpoints."""
    configured = os.environ.get(CHECKPOINTS_ENV)
    return Path(configured) if configured and not s3.is_s3(configured) else project_root() / "checkpoints"


def _checkpoint_mirror(local_dir: Path) -> str | None:
    configured = os.environ.get(CHECKPOINTS_ENV)
    return s3.join(configured, local_dir.name) if s3.is_s3(configured) else None


def _step(name: str) -> int:
    digits = name.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def restore_checkpoint(local_dir: Path) -> None:
    """Downloads the newest complete mirrored checkpoint of this run into `local_dir`, unless it is there already."""
    mirror = _checkpoint_mirror(local_dir)
    if mirror is None:
        return
    folders = {name.split("/", 1)[0] for name in s3.list_objects(mirror) if "/" in name}
    with lock(local_dir):
        for name in sorted(folders, key=_step, reverse=True):
            manifest = s3.get_json(s3.join(mirror, name, s3.MANIFEST))
            if not manifest or not manifest.get("complete"):
                continue  # the machine went away while uploading it
            if not (local_dir / name).exists():
                print(f"Restoring checkpoint {s3.join(mirror, name)}")
                with atomic_dir(local_dir / name) as staging:
                    s3.download_folder(s3.join(mirror, name), staging, manifest)
            return


def mirror_checkpoint(folder: Path) -> None:
    """Uploads a just-completed checkpoint to the mirror (if any) and removes the older ones there."""
    mirror = _checkpoint_mirror(folder.parent)
    if mirror is None:
        return
    s3.upload_folder(folder, s3.join(mirror, folder.name))
    older = [name for name in s3.list_objects(mirror) if name.split("/", 1)[0] != folder.name]
    if older:
        s3.delete_objects(mirror, older)


def remove_checkpoints(local_dir: Path) -> None:
    """A finished stage no longer needs its checkpoints, here or in the mirror."""
    shutil.rmtree(local_dir, ignore_errors=True)
    Path(f"{local_dir}.lock").unlink(missing_ok=True)  # restore_checkpoint's
    mirror = _checkpoint_mirror(local_dir)
    if mirror is not None:
        s3.delete_folder(mirror)
