"""Shared fixtures: one micro bundle built through the real CLI, and a torch-free CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Hermetic: a command run without --state never reads or writes the developer's ~/.dwfl-edge (its
# pinned bundle signer would refuse this session's freshly made keys). Subprocesses inherit it.
os.environ["EDGE_RUN_STATE"] = tempfile.mkdtemp(prefix="dwfl-test-state-")

# Runs a CLI with torch made unimportable, the way a clinic without it sees it (ModuleNotFoundError):
# proves the clinic path never needs it. (sys.modules['torch'] = None would break scipy, which
# dp-accounting imports: scipy probes sys.modules['torch'] and reads .Tensor from it.)
BLOCK_TORCH = (
    "import sys, importlib.abc\n"
    "class NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoTorch())\n"
)
NO_TORCH = BLOCK_TORCH.replace("{", "{{").replace("}", "}}") + "from {module} import main; sys.argv[0] = '{prog}'; main()\n"


def run_cli(module: str, prog: str, *args: str, block_torch: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    if block_torch:
        cmd = [sys.executable, "-c", NO_TORCH.format(module=module, prog=prog), *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # this tree's code, not an installed copy


def edge_run(*args: str, block_torch: bool = True) -> subprocess.CompletedProcess:
    return run_cli("edge_runtime.cli", "edge-run", *args, block_torch=block_torch)


def edge_export(*args: str) -> subprocess.CompletedProcess:
    return run_cli("export.cli", "edge-export", *args)


@pytest.fixture(scope="session")
def micro_out(tmp_path_factory) -> Path:
    """Output folder of `edge-export pipeline --config micro`, built once per test session."""
    out = tmp_path_factory.mktemp("micro") / "out"
    proc = edge_export("pipeline", "--out", str(out), "--config", "micro", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def micro_bundle_copy(micro_out: Path, tmp_path: Path) -> Path:
    """A private copy of the micro bundle and its key, safe to tamper with."""
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(micro_out / "bundle", dest)
    shutil.copy(micro_out / "bundle.pub", tmp_path / "bundle.pub")
    return dest


# The server tests run on SQLite and on a real PostgreSQL (one throwaway cluster per module, or
# DWFL_TEST_POSTGRES_URL); on CI a missing PostgreSQL fails, never skips.
@pytest.fixture(scope="module")
def pg_base(tmp_path_factory):
    from .server_util import postgres_base_url

    return postgres_base_url(tmp_path_factory.mktemp("pg"))


def require_postgres(pg_base: str | None) -> str:
    if pg_base is None:
        if os.environ.get("CI") or os.environ.get("DWFL_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (set DWFL_TEST_POSTGRES_URL or install postgresql-15)")
        pytest.skip("no PostgreSQL on this machine (set DWFL_TEST_POSTGRES_URL)")
    return pg_base


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, pg_base):
    """None (SQLite in the server's folder) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    from .server_util import fresh_database

    return fresh_database(require_postgres(pg_base))
