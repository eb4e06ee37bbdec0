import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from edge_runtime.errors import BadInput
from edge_runtime.synthetic import (
    InputSpec,
    SynthConfig,
    SyntheticCohort,
    case_id,
    parse_case_id,
)

SMALL = InputSpec(ct_grid=(16, 64, 64), tile=112, n_genes=200)


def _same(a, b):
    assert a.case_id == b.case_id and a.site == b.site and a.label == b.label and a.modalities == b.modalities
    for x, y in ((a.ct, b.ct), (a.genomics, b.genomics)):
        assert (x is None and y is None) or np.array_equal(x, y)
    assert (a.tiles is None and b.tiles is None) or all(np.array_equal(s, t) for s, t in zip(a.tiles, b.tiles))


def test_deterministic_per_seed_and_case_in_any_order():
    cohort = SyntheticCohort(SynthConfig(seed=5, spec=SMALL))
    forward = list(cohort.iter_cases(10, 6))
    again = SyntheticCohort(SynthConfig(seed=5, spec=SMALL))
    for case in forward[::-1]:
        _same(case, again.case(int(case.case_id.split("-")[1])))


def test_seed_changes_cases():
    a = SyntheticCohort(SynthConfig(seed=1, spec=SMALL)).case(3)
    b = SyntheticCohort(SynthConfig(seed=2, spec=SMALL)).case(3)
    assert a.label != b.label or a.site != b.site or not np.array_equal(a.genomics, b.genomics)


def test_shapes_dtypes_and_nonempty_modalities():
    cohort = SyntheticCohort(SynthConfig(seed=0, spec=SMALL))
    for case in cohort.iter_cases(0, 40):
        assert case.modalities, "every case keeps at least one modality"
        if case.ct is not None:
            assert case.ct.shape == SMALL.ct_grid and case.ct.dtype == np.float32
        if case.tiles:
            assert case.tiles[0].shape == (112, 112, 3) and case.tiles[0].dtype == np.uint8
        if case.genomics is not None:
            assert case.genomics.shape == (200,) and (case.genomics >= 0).all()


def test_sites_are_non_iid():
    cohort = SyntheticCohort(SynthConfig(seed=0, n_sites=4, spec=SMALL))
    missing_ct = []
    for site in range(4):
        cases = list(cohort.iter_cases(0, 60, site=site))
        assert all(c.site == site for c in cases)
        missing_ct.append(np.mean([c.ct is None for c in cases]))
    assert missing_ct[1] > 0.35 > missing_ct[0], "site 1 mostly lacks a CT scanner"
    assert len({p.prevalence for p in cohort.sites}) == 4
    assert len({p.stain_shift for p in cohort.sites}) == 4


def _features(cohort, case):
    """Crude hand-made read-outs of the disease signal, one per modality."""
    prof = cohort.sites[case.site]
    hu = (case.ct - prof.ct_offset_hu) / prof.ct_scale
    ct = (uniform_filter(hu, 3) > 85).sum()
    path = (case.tiles[0].mean(-1) < 150).mean()
    gen = np.log1p(case.genomics)[cohort._genes.module].mean()
    return [ct, path, gen]


def test_each_modality_partly_informative_and_fusion_beats_each():
    cohort = SyntheticCohort(SynthConfig(seed=0, n_sites=1, spec=SMALL))
    rows, labels = [], []
    for case in cohort.iter_cases(0, 700, site=0):  # site 0 has nearly every modality
        if len(case.modalities) == 3:
            rows.append(_features(cohort, case))
            labels.append(case.label)
    x, y = np.asarray(rows, float), np.asarray(labels)
    x = (x - x.mean(0)) / x.std(0)
    half = len(y) // 2
    single = []
    for m in range(3):
        auc = roc_auc_score(y[half:], x[half:, m])
        assert 0.6 < auc < 0.93, f"modality {m} should be informative, not decisive (AUC {auc:.3f})"
        single.append(auc)
    fused = LogisticRegression().fit(x[:half], y[:half]).predict_proba(x[half:])[:, 1]
    assert roc_auc_score(y[half:], fused) > max(single) + 0.02


def test_case_ids():
    assert case_id(42) == "case-000042"
    assert parse_case_id("case-000042") == 42 == parse_case_id("42")
    for bad in ("case-", "patient-1", "-3", "4.2"):
        with pytest.raises(BadInput):
            parse_case_id(bad)


def test_dirichlet_label_skew():
    mild = SyntheticCohort(SynthConfig(seed=0, n_sites=8, spec=SMALL))
    skewed = SyntheticCohort(SynthConfig(seed=0, n_sites=8, spec=SMALL, label_alpha=0.3))
    spread = lambda c: np.std([p.prevalence for p in c.sites])  # noqa: E731
    assert spread(skewed) > spread(mild)
    assert all(0.05 <= p.prevalence <= 0.95 for p in skewed.sites)
