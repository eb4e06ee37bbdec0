"""Named pipeline configurations: `tiny` (tests and demo, minutes on 2 cores) and `full` (real use)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edge_runtime.errors import BadInput
from edge_runtime.finetune.plan import FEDERATED_PLAN, FinetunePlan
from edge_runtime.synthetic import InputSpec
from federation.aggregation import DEFAULT_STRATEGY

# First synthetic case index of the validation and test splits (training starts at 0).
VAL_START, TEST_START = 500_000, 1_000_000
# The encoder candidates the export builds (export.candidates.default_variants), FP32 first: the reference.
VARIANT_NAMES = ("fp32", "int8", "int8_ct_stem_fp32", "int8_ct_3d_fp32", "int8_ct_stem_fp32_entropy", "int8_ct_stem_fp32_percentile")


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # shared embedding space
    teacher_ct: tuple[int, ...]  # channels per 3D ResNet stage (basic blocks)
    teacher_path: tuple[int, ...]  # channels per 2D ResNet stage
    teacher_path_blocks: tuple[int, ...]
    teacher_path_bottleneck: bool  # bottleneck blocks (ResNet-50 style) or basic blocks
    teacher_gen: tuple[int, ...]  # hidden sizes of the self-normalizing MLP
    student_ct: tuple[int, ...]  # depthwise-separable 3D stages
    student_path: tuple[int, ...]
    student_gen: int


@dataclass(frozen=True)
class TrainConfig:
    train_cases: int = 800
    val_cases: int = 160  # picks the best epoch: small cohorts overfit within a few epochs
    test_cases: int = 300
    stats_cases: int = 128  # cases used to fit colour / gene statistics
    calib_cases: int = 32
    teacher_epochs: int = 5  # federated: rounds of one local epoch each
    teacher_training: str = "federated"  # "federated" (DW-FL over the cohort's sites) or "central"
    teacher_strategy: str = DEFAULT_STRATEGY  # federated: the aggregation rule (part of the work folder's identity)
    student_epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.05
    modality_dropout: float = 0.25
    augment: bool = True  # flips / turns of images, noise on expression
    contrastive_weight: float = 0.2
    contrastive_temperature: float = 0.2
    aux_weight: float = 0.1  # multi-task: auxiliary risk-score regression; 0 turns it off
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5  # weight of the KL term; (1 - alpha) on the label loss
    feature_weight: float = 0.5


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    input: InputSpec
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    n_sites: int = 4
    classes: tuple[str, ...] = ("negative", "positive")
    finetune: FinetunePlan = FEDERATED_PLAN  # what the clinics of the bundle's federation train, signed in the bundle

    def with_train(self, **changes) -> "PipelineConfig":
        return replace(self, train=replace(self.train, **changes))


TINY = PipelineConfig(
    name="tiny",
    input=InputSpec(),
    model=ModelConfig(
        dim=64,
        teacher_ct=(8, 16, 32),
        teacher_path=(16, 32, 64),
        teacher_path_blocks=(1, 1, 1),
        teacher_path_bottleneck=False,
        teacher_gen=(64, 32),
        student_ct=(8, 16, 32),
        student_path=(16, 32, 48),
        student_gen=64,
    ),
)

# Real use: ResNet-50 pathology encoder, 3D ResNet-18-style CT encoder; GPU welcome.
FULL = PipelineConfig(
    name="full",
    input=InputSpec(),
    model=ModelConfig(
        dim=256,
        teacher_ct=(64, 128, 256, 512),
        teacher_path=(64, 128, 256, 512),
        teacher_path_blocks=(3, 4, 6, 3),
        teacher_path_bottleneck=True,
        teacher_gen=(1024, 512),
        student_ct=(16, 32, 64, 96),
        student_path=(16, 32, 64, 96, 128),
        student_gen=128,
    ),
    train=TrainConfig(train_cases=4000, val_cases=500, test_cases=1000, teacher_epochs=20, student_epochs=20, batch_size=32, lr=1e-3),
)

# Smoke tests only: small inputs and few cases, seconds on 2 cores. Accuracy is not its point.
MICRO = PipelineConfig(
    name="micro",
    # the rule before plans (every head parameter, one round): the suite's server, fault and soak tests
    # send whole-head updates; tests/test_federation_gain.py signs the shipped plan into a copy
    finetune=FinetunePlan(),
    input=InputSpec(ct_grid=(8, 32, 32), tile=32, n_genes=64),
    model=replace(TINY.model, dim=16, teacher_gen=(32, 16), student_gen=16),
    train=TrainConfig(
        train_cases=64, val_cases=16, test_cases=48, stats_cases=32, calib_cases=8, teacher_epochs=2, student_epochs=2
    ),
)

CONFIGS = {c.name: c for c in (TINY, FULL, MICRO)}


def get_config(name: str) -> PipelineConfig:
    if name not in CONFIGS:
        raise BadInput(f"unknown config {name!r}: choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]
