import pytest
import torch

from edge_runtime import MODALITIES
from export.config import MICRO, TrainConfig
from export.models import GatedAttentionFusion, Student, Teacher
from export.train import distillation_loss, drop_modalities

G = MICRO.input.n_genes


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, h, w = MICRO.input.ct_grid
    t = MICRO.input.tile
    return {
        "ct": torch.randn(n, 1, d, h, w, generator=g),
        "pathology": torch.randn(n, 3, t, t, generator=g),
        "genomics": torch.randn(n, G, generator=g),
    }


@pytest.mark.parametrize("cls", [Teacher, Student])
def test_shapes_and_absent_modalities_do_not_leak(cls):
    torch.manual_seed(0)
    model = cls(MICRO.model, G, 2).eval()
    x = _inputs(4)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    with torch.no_grad():
        logits, emb = model(x, mask)
        assert logits.shape == (4, 2) and emb.shape == (4, 3, MICRO.model.dim)
        assert torch.all(emb[mask == 0] == 0)
        # Changing what sits in an absent modality's slot must not change anything.
        x2 = {m: v.clone() for m, v in x.items()}
        x2["ct"][1] += 100.0
        x2["pathology"][2] -= 50.0
        logits2, _ = model(x2, mask)
    assert torch.allclose(logits, logits2)


def test_fusion_ignores_masked_tokens():
    torch.manual_seed(0)
    fusion = GatedAttentionFusion(8, 4)
    tokens = torch.randn(2, 3, 8)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    fused, weights = fusion(tokens, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert torch.all(weights[mask == 0] < 1e-6)
    assert torch.allclose(fused[1], tokens[1, 2], atol=1e-6)


def test_modality_dropout_keeps_one_and_only_drops():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]).repeat(200, 1)
    dropped = drop_modalities(mask, 0.6, gen)
    assert torch.all(dropped <= mask)
    assert torch.all(dropped.sum(1) >= 1)
    assert 0.2 < 1 - dropped[mask == 1].mean() < 0.6  # some dropping happens


def test_alignment_loss_prefers_aligned_cases():
    torch.manual_seed(0)
    teacher = Teacher(MICRO.model, G, 2)
    base = torch.randn(16, 1, MICRO.model.dim)
    aligned = base.repeat(1, 3, 1) + 0.01 * torch.randn(16, 3, MICRO.model.dim)
    shuffled = aligned.clone()
    shuffled[:, 1] = shuffled[torch.randperm(16), 1]
    mask = torch.ones(16, 3)
    assert teacher.alignment.loss(aligned, mask) < teacher.alignment.loss(shuffled, mask)


def test_distillation_loss_zero_gap_terms():
    cfg = TrainConfig(kd_alpha=1.0, feature_weight=1.0)
    logits = torch.randn(4, 2)
    emb = torch.randn(4, 3, 5)
    mask = torch.ones(4, 3)
    same = distillation_loss(logits, emb, logits, emb, torch.zeros(4, dtype=torch.long), mask, cfg)
    assert same.abs() < 1e-6
    worse = distillation_loss(logits, emb + 1, logits, emb, torch.zeros(4, dtype=torch.long), mask, cfg)
    assert worse == pytest.approx(1.0, abs=1e-5)


def test_student_is_smaller_than_teacher():
    from export.models import count_parameters

    assert count_parameters(Student(MICRO.model, G, 2)) < count_parameters(Teacher(MICRO.model, G, 2))
    assert len(MODALITIES) == 3


def test_fit_keeps_the_best_validation_epoch(tmp_path):
    import re

    from edge_runtime.synthetic import SynthConfig, SyntheticCohort
    from export.data import PreparedCases
    from export.stats import fit_preprocessing
    from export.train import train_teacher, validation_auc

    cohort = SyntheticCohort(SynthConfig(seed=1, spec=MICRO.input))
    pre = fit_preprocessing(cohort.iter_cases(0, 16), MICRO.input)
    data = PreparedCases(tmp_path / "train", cohort, pre, range(48))
    val = PreparedCases(tmp_path / "val", cohort, pre, range(500, 540))
    assert len(data) == 48 and data.arrays["ct"].dtype.name == "float16"
    lines: list[str] = []
    cfg = TrainConfig(teacher_epochs=4, batch_size=8, lr=1e-2)
    teacher = train_teacher(Teacher(MICRO.model, G, 2), data, val, cfg, seed=0, log=lines.append)
    aucs = [float(re.search(r"validation AUC (\S+)", line).group(1)) for line in lines]
    assert len(aucs) == 4
    assert validation_auc(teacher, val, 8) == pytest.approx(max(aucs), abs=1e-4)
    assert not teacher.training


def test_augment_is_label_preserving_geometry_only():
    from export.train import augment

    gen = torch.Generator().manual_seed(0)
    x = _inputs(6)
    out = augment(x, gen)
    assert all(out[m].shape == x[m].shape for m in x)
    for i in range(6):
        # Flips and turns permute voxels: the multiset of values of every case is unchanged.
        for m in ("ct", "pathology"):
            assert torch.allclose(out[m][i].flatten().sort().values, x[m][i].flatten().sort().values)
    assert not torch.equal(out["ct"], x["ct"]) and not torch.equal(out["pathology"], x["pathology"])
    assert 0.05 < (out["genomics"] - x["genomics"]).std() < 0.2


def test_student_adapters_receive_gradients():
    """A zero-initialised ReLU adapter has a zero gradient everywhere and would never train."""
    import torch

    from export.models import StudentHead

    torch.manual_seed(0)
    head = StudentHead(16, 2)
    emb, mask = torch.randn(8, 3, 16), torch.ones(8, 3)
    torch.nn.functional.cross_entropy(head(emb, mask), torch.tensor([0, 1] * 4)).backward()
    for adapter in head.adapters:
        assert float(adapter.lin.weight.grad.abs().sum()) > 0
