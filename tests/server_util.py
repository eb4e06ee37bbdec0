"""Helpers for the server tests: a real `edge-server serve` (uvicorn) on 127.0.0.1 in a subprocess,
a throwaway PostgreSQL when one is available, and updates written by the update codec."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edge_server(*args: str, patch: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    code = f"import sys\n{patch}\nfrom server.cli import main\nsys.argv[0] = 'edge-server'\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class ServerProcess:
    def __init__(self, home: Path, db_url: str | None, patch: str = "", tick: float = 0.3) -> None:
        self.home, self.db_url, self.patch, self.tick = home, db_url, patch, tick
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, patch: str | None = None, env: dict[str, str] | None = None) -> "ServerProcess":
        code = f"import sys\n{self.patch if patch is None else patch}\nfrom server.cli import main\nsys.argv[0] = 'edge-server'\nmain()"
        args = ["serve", "--home", str(self.home), "--port", str(self.port), "--tick", str(self.tick)]
        if self.db_url:
            args += ["--db", self.db_url]
        self.log = open(self.home / f"serve-{time.time_ns()}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL
        if self.proc:
            self.proc.wait(10)

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        self.kill9()
        self.log.close()


def postgres_base_url(tmp_root: Path) -> str | None:
    url = os.environ.get("DWFL_TEST_POSTGRES_URL")
    if url:
        return url
    if not Path("/usr/lib/postgresql/15/bin/initdb").exists():
        return None
    import tempfile  # not under pytest's private tmp: the cluster may run as the postgres user

    proc = subprocess.run(["bash", str(ROOT / "scripts/start_postgres.sh"), tempfile.mkdtemp(prefix="dwfl-pg-")], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def fresh_database(base_url: str) -> str:
    import psycopg

    name = f"dwfl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base_url.rsplit("/", 1)[0] + "/" + name


def write_fake_update(state: Path, head: dict, seed: int, n: int = 50, scale: float = 0.01, mutate=None) -> tuple[Path, str]:
    """An update in the outbox format, written by the clinic's own ClinicState.write_update."""
    from edge_runtime.state import ClinicState

    rng = np.random.default_rng(seed)
    delta = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in head.items()}
    if mutate:
        delta = mutate(delta)
    update_id = f"u-{seed}-{uuid.uuid4().hex[:8]}"
    meta = {"update_id": update_id, "n": n, "val_loss": 0.6 + 0.01 * seed,
            "modality_fraction": {"ct": 1.0, "pathology": 0.5, "genomics": 0.5}, "noise_multiplier": 1.0}
    return ClinicState(state).write_update(update_id, delta, meta), update_id


def published_server(root: Path, bundle: Path, **config):
    """An in-process Server in ``root/srv`` with ``config``, the micro bundle published as version 1."""
    from edge_runtime.bundle import default_public_key_path
    from edge_runtime.keys import load_public_key
    from server.home import Config, Home
    from server.service import Server

    home = Home(Path(root) / "srv")
    home.init(Config(**config))
    srv = Server(home)
    srv.publish_bundle(bundle, load_public_key(default_public_key_path(bundle)))
    return srv
