"""The project's container image: build it with podman or docker, tagged by the content of what goes into it.

The tag is `rlhf-pipeline:<variant>-<hash>` where the hash covers the Dockerfile and everything it copies (the lock,
pyproject.toml, README.md, src/), so a changed source gives a new tag and the local Docker runner can tell a stale
image from a current one. Two routes for machines without a registry: `debian_base` makes a Debian base with
debootstrap, and `host_pip` lets pip inside the build use this machine's pip configuration (mirror, wheel folders,
CA bundle). Nothing runs on import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rlhf import tracking

NAME = "rlhf-pipeline"
DEBIAN_BASE = "localhost/rlhf-debian-base:bookworm"
SOURCE_LABEL = "io.rlhf.source-hash"
# What the Dockerfile copies, besides src/ (keep in step with its COPY lines).
CONTEXT_FILES = ("Dockerfile", "constraints.txt", "pyproject.toml", "README.md")
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}


class ImageError(RuntimeError):
    """An image that could not be built or found; the message is one line."""


def _context_files(root: Path) -> list[Path]:
    """The files the image is built from: the Dockerfile and what it copies."""
    files = [root / name for name in CONTEXT_FILES]
    files += sorted(
        path
        for path in (root / "src").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path)
    )
    for path in files:
        if not path.exists():
            raise ImageError(f"{path}: missing; build the image from the project's root (it needs {path.name})")
    return files


def source_hash(root: Path) -> str:
    """The sha256 (16 hex digits) of the files the image is built from."""
    digest = hashlib.sha256()
    for path in _context_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _snapshot(root: Path, folder: Path) -> Path:
    for path in _context_files(root):
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def checkout() -> Path | None:
    """The project checkout this rlhf runs from (an editable install), which holds the Dockerfile; None for an
    installed package."""
    import rlhf

    root = Path(rlhf.__file__).resolve().parents[2]
    return root if (root / "Dockerfile").exists() else None


def default_tag(root: Path, variant: str = "cpu") -> str:
    return f"localhost/{NAME}:{variant}-{source_hash(root)}"


def engine(name: str | None = None) -> str:
    """podman or docker: the one asked for, else the first installed."""
    for candidate in [name] if name else ["podman", "docker"]:
        if shutil.which(candidate):
            return candidate
    raise ImageError(f"{name or 'podman or docker'}: not installed (Debian: apt-get install podman runc)")


def image_label(tool: str, image: str) -> str | None:
    """The image's source-hash label; None when the image is not here."""
    result = subprocess.run(
        [tool, "image", "inspect", "--format", f'{{{{index .Config.Labels "{SOURCE_LABEL}"}}}}', image],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def image_size(tool: str, image: str) -> int:
    result = subprocess.run(
        [tool, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip())


def debian_base(
    tool: str, name: str = DEBIAN_BASE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian"
) -> str:
    """A Debian base with python3 and python3-venv, made with debootstrap and imported; reused when present."""
    if image_label(tool, name) is not None:
        return name
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap: not installed (Debian: apt-get install debootstrap); or give --base IMAGE")
    with tempfile.TemporaryDirectory(prefix="rlhf-debian-") as folder:
        print(f"making the base image {name}: debootstrap {suite} from {mirror} (a few minutes)", flush=True)
        _check(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", suite, folder, mirror],
            f"debootstrap {suite}",
            quiet=True,
        )
        # What an image does not need (about 140 MB): the downloaded packages, the package lists, docs, locales.
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ):
            for path in (Path(folder) / junk).glob("*"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        tar = subprocess.Popen(["tar", "-C", folder, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([tool, "import", "-", name], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        if imported.returncode or tar.returncode:
            last_line = (imported.stderr.strip().splitlines() or [f"exit {imported.returncode or tar.returncode}"])[-1]
            raise ImageError(f"{tool} import {name}: {last_line}")
    return name


def _pip_settings() -> dict[str, str]:
    """This machine's pip configuration (files and PIP_* variables), as `pip config list` reports it."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'")
    return settings


def host_pip(scratch: Path, wheel_folders: bool = True) -> list[str]:
    """Build options that give pip inside the build this machine's index, wheel folders, constraints and CA bundle:
    a pip.conf at /etc/pip.conf and every local path it names, mounted read-only (podman build -v). Without
    `wheel_folders` the local wheels (find-links) are left out, e.g. where they hold a CPU build of torch."""
    keep = (
        "index-url",
        "extra-index-url",
        "cert",
        "constraint",
        "trusted-host",
        "timeout",
        *(["find-links"] if wheel_folders else []),
    )
    settings = {key: value for key, value in _pip_settings().items() if key in keep}
    paths = set()
    for key in ("index-url", "extra-index-url", "find-links", "cert", "constraint"):
        for item in settings.get(key, "").split():
            path = urlparse(item).path if item.startswith("file:") else item
            if key.endswith("index-url") and path.startswith("/"):
                path = str(Path(path).parent)  # a local index's pages link to files beside its simple/ folder
            if path.startswith("/") and Path(path).exists():
                paths.add(path)
    conf = scratch / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    options = ["--volume", f"{conf}:/etc/pip.conf:ro"]
    for path in sorted(paths):
        options += ["--volume", f"{path}:{path}:ro"]
    return options


@dataclass
class Built:
    image: str
    size_bytes: int
    seconds: float


def build(
    root: Path,
    variant: str = "cpu",
    base: str | None = None,
    tag: str | None = None,
    tool: str | None = None,
    torch_index: str | None = None,
    use_host_pip: bool = False,
    debian: bool = False,
) -> Built:
    """Builds the image from the project at `root` and returns its name, size and build time."""
    tool = engine(tool)
    if variant not in TORCH_INDEX:
        raise ImageError(f"--variant {variant}: expected one of {', '.join(TORCH_INDEX)}")
    if debian:
        base = debian_base(tool)
    image = tag or default_tag(root, variant)
    source = source_hash(root)
    # With this machine's pip configuration, torch comes from there too (its mirror or wheel folder).
    index = torch_index if torch_index is not None else "" if use_host_pip else TORCH_INDEX[variant]
    command = [
        tool,
        "build",
        "--tag",
        image,
        "--build-arg",
        f"TORCH_INDEX_URL={index}",
        "--build-arg",
        f"TORCH_VARIANT={variant}",
        "--build-arg",
        f"SOURCE_HASH={source}",
        "--build-arg",
        f"GIT_COMMIT={tracking.git_commit(root) or ''}",
    ]
    if base:
        command += ["--build-arg", f"BASE_IMAGE={base}"]
    if tag and tag != default_tag(root, variant):
        command += ["--tag", default_tag(root, variant)]
    with tempfile.TemporaryDirectory(prefix="rlhf-image-") as scratch:
        # The context is a copy of the hashed files, so the image holds exactly what its tag and label name.
        context = _snapshot(root, Path(scratch) / "context")
        if source_hash(context) != source:
            raise ImageError("the source changed while the image was being prepared; build again")
        if use_host_pip:
            if tool != "podman":
                raise ImageError("--host-pip mounts pip's configuration into the build, which needs podman")
            command += host_pip(Path(scratch), wheel_folders=variant == "cpu")
        # Host networking: the build's pip reaches the same mirrors and proxies as this machine.
        command += ["--network", "host", str(context)]
        started = time.monotonic()
        print(f"building {image} ({variant}, base {base or 'python:3.11-slim'}, source {source})", flush=True)
        _check(command, f"{tool} build")
    return Built(image, image_size(tool, image), time.monotonic() - started)


def _check(command: list[str], what: str, quiet: bool = False) -> None:
    """Runs `command`, its output on the console (the build's progress); one line on failure."""
    result = subprocess.run(
        command, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE if quiet else None, text=True
    )
    if result.returncode:
        detail = (result.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise ImageError(f"{what} failed (exit {result.returncode}){': ' + detail[0] if detail else ''}")


def push(image: str, tool: str | None = None) -> None:
    tool = engine(tool)
    _check([tool, "push", image], f"{tool} push {image}")


def current(root: Path | None, image: str | None, tool: str | None = None) -> str:
    """The image to run the pipeline in: `image` if given and built from this source, else the default tag of
    this source. A missing or stale image is refused with the command that builds the right one. Without a
    checkout (`root` None) there is no source to compare: `image` is taken as it is."""
    tool = engine(tool)
    if root is None:
        if not image:
            raise ImageError("--runner docker needs --image here: rlhf is not running from a checkout to build from")
        return image
    source = source_hash(root)
    image = image or default_tag(root)
    label = image_label(tool, image)
    if label is None:
        raise ImageError(
            f"{image}: no such image here; build it from this source with `rlhf image build` (add "
            "--debian-base --host-pip where no registry is reachable)"
        )
    if label != source:
        raise ImageError(
            f"{image}: built from other sources ({SOURCE_LABEL} {label or 'missing'}, this tree "
            f"{source}); rebuild with `rlhf image build`"
        )
    return image


@contextlib.contextmanager
def docker_api() -> Iterator[None]:
    """A Docker API for kfp's DockerRunner: docker's own (or DOCKER_HOST's), else podman's, served on a private
    socket for as long as the block runs."""
    import docker

    try:
        docker.from_env().ping()
        yield
        return
    except docker.errors.DockerException:
        if not shutil.which("podman"):
            raise ImageError(
                "no Docker API answers (DOCKER_HOST or /var/run/docker.sock) and podman is not installed"
            ) from None
    with tempfile.TemporaryDirectory(prefix="rlhf-podman-") as folder:
        socket = Path(folder) / "podman.sock"
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        before = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = f"unix://{socket}"
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                if service.poll() is not None or time.monotonic() > deadline:
                    raise ImageError(f"podman system service did not start (exit {service.poll()})")
                time.sleep(0.1)
            yield
        finally:
            service.terminate()
            service.wait(timeout=30)
            if before is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = before
