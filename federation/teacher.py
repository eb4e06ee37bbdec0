"""The teacher federation's shared definitions (DESIGN §10), torch-free: the server and the
hospitals both use them.

A global teacher version holds three files, listed with their SHA-256 in the server-signed manifest:

    teacher.safetensors        the shared parameters (float32): what hospitals train and the server averages
    teacher_local.safetensors  the first version's normalisation layers (FedBN: they never leave a
                               hospital; one that has none of its own yet starts from these)
    teacher.json               TeacherSpec: the model configuration, classes, preprocessing

A hospital's update is a safetensors file of Delta = theta_hospital - theta_global over exactly the
shared parameters, sealed as a stream (federation.sealed_stream) and uploaded in chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edge_runtime import MODALITIES
from edge_runtime.errors import BadInput

from .sealed_stream import sealed_size
from .tensor_stream import plain_size_bounds

WEIGHTS = "teacher.safetensors"
LOCAL_INIT = "teacher_local.safetensors"
SPEC = "teacher.json"
FILES = (WEIGHTS, LOCAL_INIT, SPEC)


def branch_of(name: str) -> str | None:
    """Which modality branch a teacher parameter belongs to (None: shared fusion / classifier)."""
    for m in MODALITIES:
        if name.startswith((f"encoders.{m}.", f"alignment.proj.{m}.")):
            return m
    return None


@dataclass(frozen=True)
class TeacherSpec:
    """What a hospital needs to build and train the federation's teacher: the named pipeline
    configuration (export.config: model, inputs, classes), the training settings every hospital
    uses (TrainConfig's fields), the preprocessing every hospital applies, whether normalisation
    layers stay local (FedBN), and the seed the first global teacher was made with."""

    config: str
    preprocessing: dict
    train: dict
    local_norm: bool = True
    seed: int = 0
    local_tensors: list[str] = field(default_factory=list)  # names in teacher_local.safetensors

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict, where: str = SPEC) -> "TeacherSpec":
        try:
            return cls(**doc)
        except TypeError as exc:
            raise BadInput(f"{where}: not a teacher specification ({exc})") from None


def sealed_size_bounds(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """The ciphertext sizes an honest update of these tensors can have: a declared size outside is
    refused before any byte is stored."""
    low, high = plain_size_bounds(shapes)
    return sealed_size(low), sealed_size(high)
