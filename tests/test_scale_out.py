"""Scale-out on PostgreSQL (issue 16): two `edge-server serve` processes, one database, one server
folder; 50 clinics and 3 hospitals at once; the aggregating process killed -9, the other takes over.
The scenario is benchmarks/scale_out.py's (the benchmark reports its timings)."""

from __future__ import annotations

import pytest

from tests.conftest import require_postgres
from tests.server_util import fresh_database

pytest.importorskip("torch")


def test_two_servers_one_postgres_fifty_clinics_three_hospitals(tmp_path, micro_out, pg_base):
    from benchmarks.scale_out import scenario
    from export.hospital import teacher_init

    teacher_init(tmp_path / "teacher", config_name="tiny", seed=0, sites=3, cases_per_site=24)
    f = scenario(tmp_path / "run", bundle=micro_out / "bundle", teacher=tmp_path / "teacher", db_url=fresh_database(require_postgres(pg_base)),
                 clinics=50, hospitals=3, lease=2.0)
    c, k = f["concurrent"], f["kill_during_aggregation"]
    assert c["errors"] == 0, c["error_samples"]
    assert c["rounds"]["head"] == {**c["rounds"]["head"], "versions": 1, "n_updates": 50}
    assert c["rounds"]["teacher"]["versions"] == 1 and c["rounds"]["teacher"]["n_updates"] == 3
    assert k["versions"] == 1, "the round taken over is aggregated exactly once"
    assert k["processes_alive_after"] == 1, "one process was killed while aggregating, the other published"
    assert k["takeover_s"] >= 2.0 - 0.5, "not before the lease"
