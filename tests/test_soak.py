"""A short soak in CI: clinics syncing round after round against one real server on loopback
(benchmarks/server_soak.py runs 200 clinics for 10 minutes; the figures are in the README)."""

from __future__ import annotations

from benchmarks.server_soak import soak, summarize


def test_clinics_sync_round_after_round(micro_out, tmp_path):
    result = soak(micro_out / "bundle", tmp_path, None, clinics=12, rounds=4, minutes=10, workers=6, spread=1.0,
                  log=lambda *a, **k: None)
    s = summarize(result)
    assert s["rounds"] == 4 and s["errors"] == 0, result["rounds"]
    assert s["rounds_closed_with_every_clinic"] == 4, "every round aggregated once, with every clinic's update"
    assert [r["result_version"] for r in result["rounds"]] == [2, 3, 4, 5]
    assert s["max_versions_kept_by_a_clinic"] <= 2, "clinics keep the current version and the one before it"
    # a leak check, not a speed target: after the first rounds, a few rounds must not grow the server much
    assert s["server_rss_growth_after_round2_mb"] < 25, result["rounds"]
