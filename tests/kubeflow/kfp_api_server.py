"""A small, real HTTP stand-in for the Kubeflow Pipelines v2beta1 REST API.

It answers what `kfp.Client(host=...)` and `Client.create_run_from_pipeline_package` call (found by reading
kfp/client/client.py and kfp_server_api, and by logging requests):

    GET  /apis/v2beta1/healthz                      the constructor (when no namespace is given)
    GET  /apis/v2beta1/experiments?filter=...       create_experiment -> get_experiment(experiment_name=...)
    POST /apis/v2beta1/experiments                  create_experiment, when no experiment has that name
    GET  /apis/v2beta1/experiments/{id}
    POST /apis/v2beta1/runs                         run_pipeline: the pipeline spec inline, runtime_config.parameters
    GET  /apis/v2beta1/runs/{id}

Responses use the field names of kfp_server_api's models (experiment_id, run_id, display_name, created_at, ...).
Every request is recorded; `fail_next`/`fail_always` make an endpoint answer an HTTP error with a body, the way an
auth proxy (401/403) or a broken API server (500) would.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None
    status: int | None = None  # what the server answered


@dataclass
class Failure:
    status: int
    body: str
    reason: str | None = None
    times: int | None = None  # None: every matching request


@dataclass
class _State:
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)
    multi_user: bool = False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rpc_error(code: int, message: str) -> dict:
    """The google.rpc.Status-shaped body the real API server answers errors with."""
    return {"error": message, "code": code, "message": message, "details": []}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _send(self, status: int, payload: Any, reason: str | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        request = Request(method, parts.path, parse_qs(parts.query), dict(self.headers.items()), self._read_body())
        state = self.server.state
        with self.server.lock:
            state.requests.append(request)
            failure = self._matching_failure(method, parts.path)
        if failure is not None:
            request.status = failure.status
            self._send(failure.status, failure.body, failure.reason)
            return
        try:
            status, payload = self._route(method, parts.path, request)
        except Exception as exc:
            status, payload = 500, _rpc_error(13, f"test server error: {exc!r}")
        request.status = status
        self._send(status, payload)

    def _matching_failure(self, method: str, path: str) -> Failure | None:
        failures = self.server.state.failures
        for (fail_method, prefix), failure in list(failures.items()):
            if fail_method == method and path.startswith(prefix):
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        del failures[(fail_method, prefix)]
                return failure
        return None

    # --- the API ----------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, request: Request) -> tuple[int, Any]:
        state = self.server.state
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"commit_sha": "0123abcd", "tag_name": "2.5.0", "multi_user": state.multi_user}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, self._list_experiments(request)
        if (method, path) == ("POST", f"{API}/experiments"):
            return 200, self._create_experiment(request.body or {})
        if method == "GET" and path.startswith(f"{API}/experiments/"):
            experiment = state.experiments.get(path.rsplit("/", 1)[1])
            return (200, experiment) if experiment else (404, _rpc_error(5, "experiment not found"))
        if (method, path) == ("POST", f"{API}/runs"):
            return self._create_run(request.body or {})
        if method == "GET" and path.startswith(f"{API}/runs/"):
            run = state.runs.get(path.rsplit("/", 1)[1])
            return (200, run) if run else (404, _rpc_error(5, "run not found"))
        return 404, _rpc_error(5, f"Not Found: {method} {path}")

    def _list_experiments(self, request: Request) -> dict:
        experiments = list(self.server.state.experiments.values())
        namespace = request.query.get("namespace", [None])[0]
        if namespace:
            experiments = [item for item in experiments if item.get("namespace") == namespace]
        for predicate in json.loads(request.query.get("filter", ["{}"])[0]).get("predicates", []):
            key, value = predicate.get("key"), predicate.get("string_value", predicate.get("stringValue"))
            if predicate.get("operation") in ("EQUALS", 1):
                experiments = [item for item in experiments if item.get(key) == value]
        # The real server leaves empty lists out (proto3 JSON): {} rather than {"experiments": []}.
        return {"experiments": experiments, "total_size": len(experiments)} if experiments else {}

    def _create_experiment(self, body: dict) -> dict:
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": body.get("display_name"),
            "description": body.get("description") or "",
            "created_at": _now(),
            "namespace": body.get("namespace") or "",
            "storage_state": "AVAILABLE",
            "last_run_created_at": "1970-01-01T00:00:00Z",
        }
        with self.server.lock:
            self.server.state.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _create_run(self, body: dict) -> tuple[int, Any]:
        state = self.server.state
        if body.get("experiment_id") and body["experiment_id"] not in state.experiments:
            return 404, _rpc_error(5, f"experiment {body['experiment_id']} not found")
        if not body.get("pipeline_spec") and not body.get("pipeline_version_reference"):
            return 400, _rpc_error(3, "a run needs a pipeline spec or a pipeline version")
        run = dict(body) | {
            "run_id": str(uuid.uuid4()),
            "storage_state": "AVAILABLE",
            "created_at": _now(),
            "scheduled_at": _now(),
            "finished_at": "1970-01-01T00:00:00Z",
            "state": "PENDING",
        }
        with self.server.lock:
            state.runs[run["run_id"]] = run
        return 200, run

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State
    lock: threading.Lock


class KfpApiServer:
    """The fake API on 127.0.0.1 and a free port, served from a background thread."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State()
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, name="kfp-api-server", daemon=True)

    def start(self) -> KfpApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def state(self) -> _State:
        return self._server.state

    @property
    def requests(self) -> list[Request]:
        with self._server.lock:
            return list(self.state.requests)

    def requests_to(self, method: str, path: str) -> list[Request]:
        return [request for request in self.requests if request.method == method and request.path == API + path]

    @property
    def runs(self) -> list[dict]:
        return list(self.state.runs.values())

    @property
    def experiments(self) -> list[dict]:
        return list(self.state.experiments.values())

    def add_experiment(self, name: str, namespace: str = "") -> dict:
        """An experiment that already exists on the cluster."""
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": "",
            "created_at": _now(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
        }
        self.state.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def fail(
        self, method: str, path: str, status: int, body: Any, reason: str | None = None, times: int | None = None
    ) -> None:
        """Answer `method` requests whose path starts with API + `path` with an error (`times` None: always)."""
        text = body if isinstance(body, str) else json.dumps(body)
        self.state.failures[(method, API + path)] = Failure(status, text, reason, times)
