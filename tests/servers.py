"""Real servers on 127.0.0.1 for the integration tests: an S3 endpoint (moto), PostgreSQL, and `mlflow server`.

The S3 endpoint is moto's ThreadedMotoServer behind a small TCP relay that owns the public port. `stop()` takes both
down at once and cuts every open connection, the way a crashed or unplugged endpoint looks to its clients (moto's
own server would keep serving the keep-alive connections it already has). `cut_when(pattern)` stops it the moment a
request matching `pattern` starts to arrive: "in the middle of an upload", deterministically. `start()` brings it
back on the same port with the same buckets (moto keeps its state in this process).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY, REGION = "rlhf-test-key", "rlhf-test-secret", "us-east-1"
ARTIFACT_BUCKET = "mlflow-artifacts"  # the tracking servers' artifact store
DATA_BUCKET = "rlhf-data"  # DVC remotes, stage inputs and outputs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Endpoint:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._moto = None
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._tripwire: tuple[re.Pattern[bytes], list[int]] | None = None
        self.cut = threading.Event()  # set when a tripwire stopped the endpoint
        self._drops: tuple[re.Pattern[bytes], list[int]] | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client of this endpoint needs: the endpoint (for boto3, MLflow and us) and credentials."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        upstream = self._moto.get_host_and_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self.cut.clear()
        threading.Thread(target=self._accept, args=(self._listener, upstream), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            listener.close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    def cut_when(self, pattern: bytes | None, occurrence: int = 1) -> None:
        """Stops the endpoint when bytes matching `pattern` (e.g. a request line) come from a client for the
        `occurrence`-th time; None disarms."""
        self._tripwire = (re.compile(pattern), [occurrence]) if pattern else None

    def drop_when(self, pattern: bytes, times: int) -> list[int]:
        """Drops the connection of the next `times` requests matching `pattern` (a network blip; the endpoint stays
        up). Returns a one-item list counting the drops left."""
        left = [times]
        self._drops = (re.compile(pattern), left)
        return left

    # -- the relay ----------------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                server = socket.create_connection(upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._connections |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        tail = b""  # the end of the previous chunk, so that a request line split across two chunks still matches
        try:
            while data := source.recv(65536):
                if from_client:
                    window, tail = tail + data, data[-512:]
                    tripwire, drops = self._tripwire, self._drops
                    if tripwire is not None and tripwire[0].search(window):
                        tail = b""  # count each request once
                        tripwire[1][0] -= 1
                        if tripwire[1][0] == 0:
                            self._tripwire = None
                            self.stop()
                            self.cut.set()
                            return
                    if drops is not None and drops[1][0] > 0 and drops[0].search(window):
                        drops[1][0] -= 1
                        return  # closes both ends of this connection only
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections -= {source, target}
            for sock in (source, target):  # wakes the other direction's pump, which closes its own source
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            source.close()


class PostgresServer:
    """A throw-away PostgreSQL cluster (Debian's binaries) on 127.0.0.1, with a database for MLflow.

    PostgreSQL refuses to run as root, so as root its commands run as the `postgres` user."""

    def __init__(self) -> None:
        self.bin = self.find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="rlhf-postgres-"))
        self.port = free_port()
        self.url = f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @staticmethod
    def find_binaries() -> Path | None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
        return candidates[0].parent if candidates else None

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off",
            "start",
        )
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` in its own process group: `backend` a database URI, artifacts proxied to `artifacts`."""

    def __init__(self, root: Path, backend: str, artifacts: str, env: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend, self.artifacts, self.env = backend, artifacts, env
        self.log = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, mlflow: Path, timeout: float = 180) -> None:
        command = [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            self.artifacts,
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.process.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"OK":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer /health within {timeout:.0f} s:\n{self.log.read_text()[-6000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stops the server and the workers it spawned (its own process group), even if the leader has exited."""
        process = self.process
        if process is None:
            return

        def group_alive() -> bool:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return False
            return True

        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not group_alive():
                return
