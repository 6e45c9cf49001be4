"""`s3://` storage against a real S3 endpoint on 127.0.0.1 (moto's server): folders up and down byte for byte,
multipart transfers, the local cache, checksums, retries, progress, and one-line errors for the ways S3 fails."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest
from servers import DATA_BUCKET

from rlhf import s3 as storage_s3
from rlhf.data.io import DataError, read_rows
from rlhf.s3 import MANIFEST, StorageError
from rlhf.storage import atomic_dir, atomic_file, fetch

MIB = 1024 * 1024


def _uri(name: str) -> str:
    return f"s3://{DATA_BUCKET}/storage-tests/{name}-{uuid.uuid4().hex[:8]}"


def _tree(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _model_folder(folder: Path, big_mib: int = 0) -> Path:
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text('{"n_layer": 2}\n')
    (folder / "nested" / "tokenizer.json").write_text('{"vocab": {}}\n')
    if big_mib:
        (folder / "model.safetensors").write_bytes(os.urandom(big_mib * MIB))
    return folder


def test_a_folder_goes_up_and_comes_back_byte_identical_in_multipart_transfers(s3, tmp_path, monkeypatch, capfd):
    """Parts of 5 MiB: the 17 MiB file travels as a 4-part multipart upload, shows a progress bar, and every file
    downloads with its sha256 checked against the manifest written last."""
    monkeypatch.setenv("RLHF_S3_PART_MB", "5")
    source = _model_folder(tmp_path / "model", big_mib=17)
    uri = _uri("model")
    with atomic_dir(uri) as staging:
        for path in source.rglob("*"):
            if path.is_file():
                (staging / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                (staging / path.relative_to(source)).write_bytes(path.read_bytes())
    assert "upload" in capfd.readouterr().err  # tqdm's bar (stderr) for the 17 MiB transfer

    bucket, prefix = storage_s3.split(uri)
    weights = s3.client().head_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")
    assert weights["ETag"].strip('"').endswith("-4"), weights["ETag"]  # S3's multipart ETag: md5-of-parts-count
    assert weights["Metadata"]["sha256"] == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    assert manifest["complete"] is True
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == _tree(source)

    local = Path(fetch(uri))
    assert _tree(local) == _tree(source)  # the manifest itself stays in S3, not in the model folder


def test_the_cache_is_reused_until_the_folder_changes(s3, tmp_path):
    uri = _uri("cached")
    storage_s3.upload_folder(_model_folder(tmp_path / "v1"), uri)
    first = Path(fetch(uri))
    stamp = (first / "config.json").stat().st_mtime_ns
    assert Path(fetch(uri)) == first and (first / "config.json").stat().st_mtime_ns == stamp  # not downloaded again

    changed = _model_folder(tmp_path / "v2")
    (changed / "config.json").write_text('{"n_layer": 3}\n')
    (changed / "nested" / "tokenizer.json").unlink()
    storage_s3.upload_folder(changed, uri)
    assert _tree(Path(fetch(uri))) == _tree(changed)  # new content; the removed file is gone in S3 and locally
    assert "nested/tokenizer.json" not in storage_s3.list_objects(uri)


def test_a_single_file_and_an_atomic_file_round_trip(s3, tmp_path):
    uri = _uri("metrics") + "/metrics.json"
    with atomic_file(uri) as handle:
        handle.write('{"eval_loss": 1.5}\n')
    assert json.loads(Path(fetch(uri)).read_text()) == {"eval_loss": 1.5}


def test_a_failed_block_uploads_nothing(s3, tmp_path):
    uri = _uri("failed")
    with pytest.raises(RuntimeError, match="training diverged"), atomic_dir(uri) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("training diverged")
    assert storage_s3.list_objects(uri) == {}


def test_an_interrupted_upload_is_refused_until_it_is_redone(s3, tmp_path, monkeypatch):
    """The endpoint goes down while the weights are on their way: the upload fails with one line naming the
    endpoint, the folder's manifest still says incomplete, so a reader refuses it; after the endpoint is back, the
    same upload completes and reads back byte for byte."""
    source = _model_folder(tmp_path / "model", big_mib=1)
    uri = _uri("interrupted")
    s3.cut_when(rb"PUT /" + uri.removeprefix("s3://").encode() + rb"/model\.safetensors")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail fast once it is down
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {s3.url}"):
        storage_s3.upload_folder(source, uri)
    assert s3.cut.is_set()

    s3.start()
    with pytest.raises(StorageError, match="its upload never finished"):
        fetch(uri)
    storage_s3.upload_folder(source, uri)
    assert _tree(Path(fetch(uri))) == _tree(source)


def test_dropped_connections_are_retried(s3, tmp_path):
    """Two network blips in the middle of a file's upload: botocore retries with backoff and the upload completes."""
    source = _model_folder(tmp_path / "model", big_mib=1)
    uri = _uri("blips")
    left = s3.drop_when(rb"PUT /" + uri.removeprefix("s3://").encode() + rb"/model\.safetensors", times=2)
    storage_s3.upload_folder(source, uri)
    assert left == [0]
    assert _tree(Path(fetch(uri))) == _tree(source)


def test_a_corrupted_object_fails_its_checksum(s3, tmp_path):
    source = _model_folder(tmp_path / "model", big_mib=1)
    uri = _uri("corrupted")
    storage_s3.upload_folder(source, uri)
    bucket, prefix = storage_s3.split(uri)
    # Another writer replaces the weights behind the manifest's back.
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=os.urandom(MIB))
    with pytest.raises(StorageError, match=r"model\.safetensors: checksum mismatch"):
        fetch(uri)


def test_a_folder_from_elsewhere_without_a_manifest_is_taken_as_listed(s3, tmp_path):
    """E.g. a hub model copied with `aws s3 sync`: no manifest, every object under the prefix is the folder."""
    uri = _uri("synced")
    bucket, prefix = storage_s3.split(uri)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b"{}")
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")  # a console's "folder" marker
    assert _tree(Path(fetch(uri))) == {"config.json": hashlib.sha256(b"{}").hexdigest()}


def test_a_dataset_on_s3_reports_bad_lines_by_its_s3_location(s3, tmp_path):
    uri = _uri("data") + "/preferences.jsonl"
    local = tmp_path / "preferences.jsonl"
    local.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n')
    storage_s3.upload_file(local, uri)
    with pytest.raises(DataError, match=f"^{uri}:2: malformed JSON"):
        read_rows(uri)
    folder = uri.rsplit("/", 1)[0]
    with pytest.raises(DataError, match=f"^{folder}/preferences.jsonl:2: malformed JSON"):
        read_rows(folder)


@pytest.mark.parametrize("case", ["missing bucket", "missing key", "missing folder"])
def test_missing_locations_are_one_line_errors(s3, case):
    uri = {
        "missing bucket": "s3://no-such-bucket/data/sft.jsonl",
        "missing key": f"s3://{DATA_BUCKET}/nothing-here/sft.jsonl",
        "missing folder": f"s3://{DATA_BUCKET}/nothing-here/models/sft",
    }[case]
    expected = "bucket 'no-such-bucket' does not exist" if case == "missing bucket" else "no such object or folder"
    with pytest.raises(StorageError) as raised:
        fetch(uri)
    assert str(raised.value) == f"{uri}: {expected}"


def test_denied_access_is_a_one_line_error(s3, monkeypatch):
    """An IAM user allowed only another bucket: S3 (moto with authorization on) answers 403 AccessDenied."""
    import boto3
    from moto import settings

    iam = boto3.client(
        "iam", endpoint_url=s3.url, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    )
    user = f"reader-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::other", "arn:aws:s3:::other/*"]}
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="other-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks signatures and policies now
    uri = f"s3://{DATA_BUCKET}/anything/sft.jsonl"
    with pytest.raises(StorageError) as raised:
        fetch(uri)
    assert str(raised.value) == f"{uri}: access denied (403): check the credentials and the bucket's policy"


def test_an_unreachable_endpoint_is_a_one_line_error(monkeypatch):
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for key, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StorageError) as raised:
        fetch("s3://bucket/models/sft")
    assert str(raised.value) == f"s3://bucket/models/sft: cannot reach the S3 endpoint {url} (EndpointConnectionError)"
