"""The federation's fine-tuning plan, one home: what every clinic of a bundle trains and how it spends
its lifetime privacy budget (DESIGN §5). It travels in the signed bundle (``manifest["finetune"]``),
so every clinic of a federation trains the same parameters with the same rule and spends alike; the
server checks updates against the same trainable set. A bundle without one gets ``FinetunePlan()``,
the rule the product had before plans existed (all parameters, Adam, the whole budget in one round).

    trainable   which head parameters clinics train: "all" (16.8 k for the tiny head), "fusion+classifier",
                or "classifier" (130): DP noise grows with the square root of the parameters trained
    rounds      rounds the clinic's lifetime budget (its ledger's epsilon, 0.5 by default) is split over:
                each round gets the noise multiplier that lets ``rounds`` identical rounds compose to
                exactly that budget (accountant.plan_round)
    epochs, batch_size, lr, clip, optimizer
                the local DP-SGD of one round; batch_size at or above a clinic's training cases means
                full-batch noisy gradient descent (q = 1), the same noise multiplier for every clinic
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from ..errors import BadInput
from .dpsgd import OPTIMIZERS

TRAINABLE = {
    "all": (),  # every head parameter
    "fusion+classifier": ("fusion.", "classifier."),
    "classifier": ("classifier.",),
}


@dataclass(frozen=True, kw_only=True)
class FinetunePlan:
    trainable: str = "all"
    rounds: int = 1
    epochs: float = 10.0  # per round
    batch_size: int = 256
    lr: float = 0.01
    clip: float = 1.0
    optimizer: str = "adam"

    def check(self, where: str = "fine-tuning plan") -> "FinetunePlan":
        problems = []
        if self.trainable not in TRAINABLE:
            problems.append(f"trainable {self.trainable!r} is not one of {', '.join(TRAINABLE)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.rounds, int) and 1 <= self.rounds <= 1000):
            problems.append(f"rounds {self.rounds!r} is not in [1, 1000]")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size {self.batch_size!r} is not >= 1")
        for name, low, high in (("epochs", 0.0, 1e4), ("lr", 0.0, 1e3),
                                ("clip", 0.0, 1e6)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low < value <= high):
                problems.append(f"{name} {value!r} is not in ({low:g}, {high:g}]")
        if problems:
            raise BadInput(f"{where}: " + "; ".join(problems))
        return self

    def names(self, params: Iterable[str]) -> list[str]:
        """The trainable parameter names among ``params``, sorted."""
        prefixes = TRAINABLE[self.trainable]
        return sorted(n for n in params if not prefixes or n.startswith(prefixes))

    def rounds_left(self, done: int) -> int:
        """Rounds still planned, this one included, after ``done`` charged ones (past the plan: 1, all that is left)."""
        return max(1, self.rounds - done)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "fine-tuning plan") -> "FinetunePlan":
        if not isinstance(doc, dict):
            raise BadInput(f"{where}: not an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise BadInput(f"{where}: unknown settings {unknown[:3]}")
        try:
            plan = cls(**doc)
        except TypeError as exc:
            raise BadInput(f"{where}: {exc}") from None
        return plan.check(where)

    @classmethod
    def of_manifest(cls, manifest: dict, where: str = "bundle") -> "FinetunePlan":
        doc = manifest.get("finetune")
        return cls() if doc is None else cls.from_dict(doc, f"{where}: fine-tuning plan")


# The plan new bundles carry, chosen on paired measurements (benchmarks/federation_gain.py, README):
# the classifier only, full-batch noisy gradient descent, the lifetime budget over 10 rounds.
FEDERATED_PLAN = FinetunePlan(trainable="classifier", rounds=10, epochs=3.0, batch_size=1024, lr=2.0, clip=1.0, optimizer="sgd")


def trainable_subset(params: dict, plan: FinetunePlan) -> dict:
    """The plan's trainable parameters of a head (what an update carries and the server checks)."""
    return {n: params[n] for n in plan.names(params)}
