"""Choosing a variant from measured tables (export and clinic), and by CPU class."""

from __future__ import annotations

import pytest

from edge_runtime.cpuinfo import cpu_class
from edge_runtime.select import Measured, choose, variant_for_cpu

TABLE = [
    Measured("fp32", auc=0.810, p95_ms=20.0, model_p95_ms=9.0, peak_rss_mb=115),
    Measured("int8", auc=0.800, p95_ms=70.0, model_p95_ms=55.0, peak_rss_mb=117),  # too inaccurate
    Measured("int8_ct_stem_fp32", auc=0.808, p95_ms=15.0, model_p95_ms=6.5, peak_rss_mb=116),
    Measured("int8_ct_3d_fp32", auc=0.809, p95_ms=16.0, model_p95_ms=7.0, peak_rss_mb=400),
]


def test_fastest_within_accuracy_and_budgets():
    sel = choose(TABLE, reference_auc=0.810, tolerance=0.005, mem_budget_mb=1800, latency_budget_ms=200)
    assert sel.ok and sel.chosen == "int8_ct_stem_fp32"
    assert sel.reasons["int8"] and "AUC 0.8000 is 0.0100 below" in sel.reasons["int8"][0]
    assert sel.reasons["fp32"] == []


def test_memory_budget_excludes_a_faster_candidate():
    sel = choose(TABLE, 0.810, 0.005, mem_budget_mb=300, latency_budget_ms=200)
    assert sel.chosen == "int8_ct_stem_fp32"
    sel = choose(TABLE[:1] + TABLE[3:], 0.810, 0.005, mem_budget_mb=300, latency_budget_ms=200)
    assert sel.ok and sel.chosen == "fp32", "the faster one is over the memory budget"
    assert "peak RSS 400.0 MB > budget 300 MB" in sel.reasons["int8_ct_3d_fp32"]


def test_nothing_fits_names_the_failed_limit():
    sel = choose(TABLE, 0.810, 0.005, mem_budget_mb=1800, latency_budget_ms=10)
    assert not sel.ok
    assert sel.chosen == "int8_ct_stem_fp32", "the fastest accurate one is written"
    assert "p95 latency 15.0 ms > budget 10 ms" in sel.message()
    sel = choose(TABLE[1:2], 0.810, 0.005, 1800, 200)
    assert not sel.ok and sel.chosen == "int8" and "AUC" in sel.message()


def test_choice_does_not_depend_on_order():
    assert choose(TABLE[::-1], 0.810, 0.005, 1800, 200).chosen == choose(TABLE, 0.810, 0.005, 1800, 200).chosen


def test_empty_table_refused():
    with pytest.raises(ValueError):
        choose([], 0.8, 0.005, 1800, 200)


def test_cpu_classes():
    assert cpu_class({"avx2", "fma", "avx512_vnni"}) == "vnni"
    assert cpu_class({"avx2", "avx_vnni"}) == "vnni"
    assert cpu_class({"avx2", "fma"}) == "avx2"
    assert cpu_class(set()) == "baseline"


def test_variant_for_cpu_falls_back_to_fp32_on_a_weaker_int8_cpu():
    manifest = {"default_variant": "int8_ct_stem_fp32", "selection": {"cpu_class": "vnni"},
                "variants": [{"name": "fp32"}, {"name": "int8_ct_stem_fp32"}]}
    assert variant_for_cpu(manifest, {"avx2", "avx512_vnni"})[0] == "int8_ct_stem_fp32"
    name, why = variant_for_cpu(manifest, {"avx2", "fma"})
    assert name == "fp32" and "profile --select" in why
    measured_on_avx2 = {**manifest, "selection": {"cpu_class": "avx2"}}
    assert variant_for_cpu(measured_on_avx2, {"avx2", "avx512_vnni"})[0] == "int8_ct_stem_fp32"
