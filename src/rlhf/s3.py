"""`s3://bucket/key` locations through boto3: files and folders up and down, verified, with one-line errors.

- The endpoint is the standard one for the credentials, or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` /
  `MLFLOW_S3_ENDPOINT_URL` (MinIO, Ceph, moto), in that order; credentials come from boto3's standard chain
  (environment, profile, IAM role, web identity).
- Large files move as multipart transfers in parallel parts (`RLHF_S3_PART_MB`, default 64); every request retries
  with exponential backoff (botocore's `standard` mode, `AWS_MAX_ATTEMPTS` attempts, default 5); transfers of more
  than 16 MiB show a progress bar.
- Every uploaded file carries its sha256 as object metadata, checked after download (on top of the CRC32 checksums
  botocore adds to every request).
- A folder written here is committed by a manifest: `.rlhf-manifest.json` says `complete: false` while the upload
  runs and, last, lists every file with its sha256 and size. A reader refuses a folder whose upload never finished
  and verifies every file against the manifest; folders from elsewhere (no manifest) are taken as listed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEME = "s3://"
MANIFEST = ".rlhf-manifest.json"
SHA256_METADATA = "sha256"
_MIB = 1024 * 1024
_PROGRESS_MIN_BYTES = 16 * _MIB


class StorageError(ValueError):
    """An s3:// location that cannot be read or written; the message is one line naming it."""


def is_s3(location: str | Path | None) -> bool:
    return str(location or "").startswith(SCHEME)


def split(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key")."""
    bucket, _, key = uri.removeprefix(SCHEME).partition("/")
    if not bucket:
        raise StorageError(f"{uri}: expected s3://bucket/key")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def endpoint_url() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def client():
    """An S3 client for the current environment (cached per endpoint and credentials; clients are thread-safe)."""
    keys = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_REGION",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
    )
    return _client(endpoint_url(), tuple(os.environ.get(key) for key in keys))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, _environment: tuple):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
        },
        connect_timeout=10,
        read_timeout=120,
        # MinIO, Ceph and most self-hosted endpoints serve buckets as paths, not as host names.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    part = int(float(os.environ.get("RLHF_S3_PART_MB", "64")) * _MIB)
    return TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=8)


# -- errors ---------------------------------------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps (s3transfer wraps botocore's errors in its own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__


def describe(exc: BaseException, uri: str | None) -> str:
    """One line for what went wrong with `uri` (None: an S3 request made by another library)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = uri or f"S3 at {endpoint_url() or 'AWS'}"
    for cause in _causes(exc):
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                bucket = error.get("BucketName") or (split(uri)[0] if uri else "?")
                return f"{where}: bucket {bucket!r} does not exist"
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return f"{where}: no such object"
            if (
                code
                in (
                    "AccessDenied",
                    "403",
                    "Forbidden",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "ExpiredToken",
                    "InvalidToken",
                    "AllAccessDisabled",
                )
                or status == 403
            ):
                return f"{where}: access denied ({code}): check the credentials and the bucket's policy"
            return f"{where}: S3 answered {code or status}: {' '.join(str(error.get('Message', '')).split())}"
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return (
                f"{where}: no usable AWS credentials ({cause}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile or an IAM role"
            )
        if isinstance(cause, (ConnectionError, HTTPClientError)):
            return f"{where}: cannot reach the S3 endpoint {endpoint_url() or '(AWS default)'} ({type(cause).__name__})"
    return f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # botocore's errors, and boto3's and s3transfer's wrappers of them
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
            raise StorageError(describe(exc, uri)) from None
        raise


def _missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


# -- files ----------------------------------------------------------------------------------------------------------


def hash_file(digest, path: str | Path):
    """Feeds a file into `digest` (a hashlib object) in 1 MiB blocks; returns the digest."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_MIB), b""):
            digest.update(block)
    return digest


def file_sha256(path: str | Path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()


@contextlib.contextmanager
def _progress(total: int, description: str) -> Iterator[Any]:
    """A byte-counting callback for boto3 transfers, drawn as a bar when the transfer is large."""
    from tqdm.auto import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        disable=total < _PROGRESS_MIN_BYTES,
        leave=False,
    ) as bar:
        yield bar.update


def _upload_file(local: Path, bucket: str, key: str, sha256: str, callback=None) -> None:
    client().upload_file(
        str(local),
        bucket,
        key,
        Config=_transfer_config(),
        Callback=callback,
        ExtraArgs={"Metadata": {SHA256_METADATA: sha256}},
    )


def upload_file(local: str | Path, uri: str) -> None:
    bucket, key = split(uri)
    size = Path(local).stat().st_size
    with _errors(uri), _progress(size, f"upload {Path(local).name}") as callback:
        _upload_file(Path(local), bucket, key, file_sha256(local), callback)


def head(uri: str) -> dict[str, Any] | None:
    """The object's metadata (size, ETag, sha256), or None when there is no object at this key."""
    bucket, key = split(uri)
    with _errors(uri):
        try:
            response = client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _missing(exc):
                return None
            raise
    return {
        "size": response["ContentLength"],
        "etag": response["ETag"].strip('"'),
        "sha256": response.get("Metadata", {}).get(SHA256_METADATA),
    }


def _download_file(bucket: str, key: str, target: Path, expected_sha256: str | None, uri: str, callback=None) -> None:
    """Downloads into a temporary sibling, checks the sha256, then renames into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    try:
        client().download_file(bucket, key, str(partial), Config=_transfer_config(), Callback=callback)
        if expected_sha256 and file_sha256(partial) != expected_sha256:
            raise StorageError(f"{uri}: checksum mismatch after download (sha256 differs from the uploaded file's)")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def download_file(uri: str, target: str | Path, info: dict[str, Any] | None = None) -> None:
    bucket, key = split(uri)
    info = info or head(uri)
    if info is None:
        raise StorageError(_missing_message(uri))
    with _errors(uri), _progress(info["size"], f"download {Path(key).name}") as callback:
        _download_file(bucket, key, Path(target), info["sha256"], uri, callback)


def _missing_message(uri: str) -> str:
    """ "no such object", or that the bucket itself is missing."""
    bucket, _ = split(uri)
    with _errors(uri):
        try:
            client().head_bucket(Bucket=bucket)
        except Exception as exc:
            if _missing(exc):
                return f"{uri}: bucket {bucket!r} does not exist"
            raise
    return f"{uri}: no such object or folder"


def put_json(uri: str, payload: Any) -> None:
    bucket, key = split(uri)
    with _errors(uri):
        client().put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(payload, indent=1, sort_keys=True).encode(),
            ContentType="application/json",
        )


def get_json(uri: str, name: str | None = None) -> Any | None:
    """The JSON object at `uri`, or None when there is none; errors name `name` (default: `uri`)."""
    bucket, key = split(uri)
    with _errors(name or uri):
        try:
            body = client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _missing(exc):
                return None
            raise
    return json.loads(body)


# -- folders --------------------------------------------------------------------------------------------------------


def list_objects(uri: str) -> dict[str, dict[str, Any]]:
    """Every object under the folder `uri`, by path relative to it: {"config.json": {"size", "etag"}, ...}."""
    bucket, prefix = split(uri)
    prefix = f"{prefix}/" if prefix else ""
    found: dict[str, dict[str, Any]] = {}
    with _errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name and not name.endswith("/"):  # consoles create empty "folder" objects; they hold nothing
                    found[name] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
    return found


def delete_objects(uri: str, names: list[str]) -> None:
    bucket, prefix = split(uri)
    keys = [f"{prefix}/{name}" if prefix else name for name in names]
    with _errors(uri):
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            client().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})


def delete_folder(uri: str) -> None:
    delete_objects(uri, list(list_objects(uri)))


def upload_folder(local: str | Path, uri: str) -> dict[str, Any]:
    """Uploads every file under `local` to the folder `uri`, replacing what was there; returns the manifest.

    The manifest goes first marked incomplete and last with every file's sha256, so an interrupted upload is never
    taken for a finished one. Files of an earlier upload that this one does not have are removed.
    """
    local = Path(local)
    files = sorted(path for path in local.rglob("*") if path.is_file())
    names = [path.relative_to(local).as_posix() for path in files]
    bucket, prefix = split(uri)
    before = list_objects(uri)
    put_json(join(uri, MANIFEST), {"complete": False})
    entries: dict[str, dict[str, Any]] = {}
    with _errors(uri), _progress(sum(path.stat().st_size for path in files), f"upload {uri}") as callback:
        for path, name in zip(files, names):
            entries[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
            _upload_file(path, bucket, f"{prefix}/{name}" if prefix else name, entries[name]["sha256"], callback)
    stale = sorted(set(before) - set(names) - {MANIFEST})
    if stale:
        delete_objects(uri, stale)
    manifest = {"complete": True, "files": entries}
    put_json(join(uri, MANIFEST), manifest)
    return manifest


def folder_manifest(uri: str) -> dict[str, Any]:
    """What a folder holds: its manifest (verified downloads), or for a folder from elsewhere its listing.

    Raises StorageError for an unfinished upload and for a location with nothing under it.
    """
    manifest = get_json(join(uri, MANIFEST), name=uri)
    if manifest is not None:
        if not manifest.get("complete"):
            raise StorageError(
                f"{uri}: its upload never finished (an interrupted stage?); rerun the stage that writes it"
            )
        return manifest
    listed = list_objects(uri)
    if not listed:
        raise StorageError(_missing_message(uri))
    return {
        "complete": True,
        "files": {name: {"etag": item["etag"], "size": item["size"]} for name, item in listed.items()},
    }


def download_folder(uri: str, target: str | Path, manifest: dict[str, Any]) -> None:
    """Downloads the files `manifest` lists into `target`, checking each against its sha256 where known."""
    bucket, prefix = split(uri)
    target = Path(target)
    files = manifest["files"]
    with _errors(uri), _progress(sum(entry["size"] for entry in files.values()), f"download {uri}") as callback:
        for name, entry in sorted(files.items()):
            key = f"{prefix}/{name}" if prefix else name
            _download_file(bucket, key, target / name, entry.get("sha256"), join(uri, name), callback)
