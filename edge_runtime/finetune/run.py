"""One fine-tuning round on the clinic, start to end (``edge-run finetune``):

1. refuse bad input before anything is spent: manifest, labels (binary, both classes), bundle head,
   ledger (corrupt or edited: exit 2), budget already spent (exit 1);
2. embed each case with the frozen encoders of the variant this PC runs (ClinicState.model_for: the
   pinned one, else the export's choice for this CPU) into the on-disk cache (only cases not cached yet);
3. split train / validation per case (stable across rounds), validation loss and AUC of the start;
4. plan sigma and steps to fit the budget left, **charge the ledger (fsync)**, then train the head by
   DP-SGD in numpy;
5. write the update (delta + metadata, atomically) to the outbox; make the new head active only if
   its validation AUC is not below the active head's by more than the tolerance.

What leaves the clinic is the DP-SGD delta plus metadata released through one more Gaussian
mechanism (counts and the starting head's validation loss), both charged in the ledger. The
validation AUC and the activation decision stay on the clinic.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np

from .. import MODALITIES
from ..bundle import Bundle
from ..errors import BadInput, BudgetSpent
from ..manifest import Manifest, load_case, parse_label
from ..metrics import roc_auc
from ..model import EdgeModel
from ..preprocess import prepare_case
from ..privacy.accountant import BudgetExhausted, RoundEvents, epsilon, plan_round
from ..profiling import peak_rss_mb
from ..progress import progress
from ..state import ActiveHead, ClinicState, bundle_head, bundle_head_key
from . import dpsgd
from .cache import EmbeddingCache, bundle_encoder_key, fingerprint
from .head import Params, forward, losses, softmax
from .plan import FinetunePlan

EVAL_CHUNK = 512


@dataclass(frozen=True)
class FinetuneOptions:
    epsilon: float | None = None  # the clinic's whole participation, this dataset (None: the ledger's; 0.5 for a new one)
    delta: float | None = None  # None: the ledger's (1e-5 for a new one)
    dataset: str = "default"
    round_epsilon: float | None = None  # at most this much in this round (None: the plan's share of what is left)
    # None: the bundle's fine-tuning plan (FinetunePlan; a bundle without one: 10 epochs, batch 256, C 1, lr 0.01, 1 round)
    epochs: float | None = None
    batch_size: int | None = None  # expected (Poisson) batch size: q = min(1, batch_size / n_train)
    clip: float | None = None  # C
    lr: float | None = None
    rounds: int | None = None  # rounds the lifetime budget is split over (1: spend it all now)
    val_fraction: float = 0.2
    tolerance: float = 0.02  # validation AUC may fall at most this much for the new head to go live
    meta_noise: float = 20.0  # noise multiplier of the metadata release
    loss_clip: float = 3.0  # per-case loss bound in the released validation loss
    seed: int | None = None  # tests only: None draws the noise from the OS's entropy
    cache_mb: float = 512.0
    variant: str | None = None
    threads: int = 2

    def check(self) -> None:
        if self.epsilon is not None and not 0 < self.epsilon <= 100:
            raise BadInput(f"--epsilon must be in (0, 100], got {self.epsilon:g}")
        if self.delta is not None and not 0 < self.delta < 1e-2:
            raise BadInput(f"--delta must be in (0, 0.01), got {self.delta:g}")
        if self.round_epsilon is not None and self.round_epsilon <= 0:
            raise BadInput(f"--round-epsilon must be > 0, got {self.round_epsilon:g}")
        given = [v for v in (self.epochs, self.batch_size, self.clip, self.lr, self.rounds) if v is not None]
        if not (all(v > 0 for v in given) and 0 < self.val_fraction < 1 and self.tolerance >= 0 and self.meta_noise > 0
                and self.cache_mb > 0):
            raise BadInput("fine-tuning options out of range (epochs, batch size, clip, lr, rounds, cache > 0; "
                           "validation fraction in (0, 1))")

    def plan(self, bundle_plan: FinetunePlan) -> FinetunePlan:
        """The bundle's plan with the options given here in its place (checked)."""
        chosen = {k: getattr(self, k) for k in ("epochs", "batch_size", "clip", "lr", "rounds") if getattr(self, k) is not None}
        return replace(bundle_plan, **chosen).check("fine-tuning options")


@dataclass
class Labelled:
    case_ids: list[str]
    labels: np.ndarray  # int64 class index
    lines: list[int]


def check_labels(manifest: Manifest, classes: list[str]) -> Labelled:
    """Every usable row needs a binary label; both classes must occur."""
    if len(classes) != 2:
        raise BadInput(f"fine-tuning needs a binary model; the bundle has {len(classes)} classes")
    ids, labels, lines = [], [], []
    for e in manifest.entries:
        if e.problem:
            continue
        if not e.label:
            raise BadInput(f"{manifest.path}: line {e.line} (case {e.case_id}) has no label; fine-tuning needs one for every case")
        try:
            labels.append(parse_label(e.label, classes))
        except BadInput as exc:
            raise BadInput(f"{manifest.path}: line {e.line} (case {e.case_id}): {exc} (labels must be binary)") from exc
        ids.append(e.case_id)
        lines.append(e.line)
    if not ids:
        raise BadInput(f"{manifest.path}: manifest has no usable case")
    arr = np.asarray(labels, dtype=np.int64)
    if len(np.unique(arr)) < 2:
        raise BadInput(f"{manifest.path}: every label is {classes[int(arr[0])]!r}; fine-tuning needs cases of both classes")
    return Labelled(ids, arr, lines)


def _case_hash(clinic: str, case_id: str) -> float:
    """In [0, 1): stable per case across rounds, unpredictable without the clinic id."""
    return int.from_bytes(hashlib.sha256(f"{clinic}\n{case_id}".encode()).digest()[:8], "big") / 2**64


def validation_split(clinic: str, case_ids: list[str], labels: np.ndarray, fraction: float, per_class: int = 2) -> np.ndarray:
    """Boolean mask of the validation cases: the stable hash split, stratified so that each class
    keeps at least ``per_class`` validation cases and as many training cases (when it has them):
    a small clinic never loses a round to an unlucky draw of its split."""
    h = np.array([_case_hash(clinic, c) for c in case_ids])
    val = h < fraction
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        order = idx[np.argsort(h[idx])]  # lowest hash first: the same cases every round
        need = min(per_class, len(idx) // 2)
        if val[idx].sum() < need:
            val[order[:need]] = True
        if (~val[idx]).sum() < need:
            val[order[::-1][:need]] = False
    return val


def fill_cache(model: EdgeModel, bundle: Bundle, manifest: Manifest, cache: EmbeddingCache, wanted: set[str],
               log=lambda s: None) -> tuple[dict[str, int], dict[str, str]]:
    """Row of every wanted case (encoding the ones not cached yet, one at a time); rejected cases with reasons."""
    rows, rejected, added = {}, {}, 0
    for e in manifest.entries:
        if e.case_id not in wanted:
            continue
        fp = fingerprint([e.ct, e.pathology, e.genomics], manifest.folder)
        row = cache.lookup(e.case_id, fp)
        if row is None:
            try:
                prepared = prepare_case(load_case(e, manifest.folder, bundle.preprocessing, bundle.classes), bundle.preprocessing)
                if not prepared.inputs:
                    raise BadInput("case has no usable modality")
            except BadInput as exc:
                rejected[e.case_id] = str(exc)
                continue
            emb = np.zeros((len(MODALITIES), model.dim), np.float32)
            mask = np.zeros(len(MODALITIES), np.uint8)
            for i, m in enumerate(MODALITIES):
                if m in prepared.inputs:
                    emb[i], mask[i] = model.embed(m, prepared.inputs[m]), 1
            row = cache.add(e.case_id, fp, emb, mask)
            added += 1
            if added % 256 == 0:
                cache.flush()
                log(f"embedded {added} cases")
        rows[e.case_id] = row
    if added:
        cache.flush()
    return rows, rejected


def evaluate(params: Params, cache: EmbeddingCache, rows: np.ndarray, labels: np.ndarray) -> dict:
    """Validation AUC and mean loss, read in chunks (memory flat in the number of cases)."""
    probs, loss = [], []
    for s in range(0, len(rows), EVAL_CHUNK):
        emb, mask = cache.read(rows[s:s + EVAL_CHUNK])
        y = labels[s:s + EVAL_CHUNK]
        probs.append(softmax(forward(params, emb, mask))[:, -1])
        loss.append(losses(params, emb, mask, y))
    p, l_ = np.concatenate(probs), np.concatenate(loss)
    return {"auc": roc_auc(labels == 1, p), "loss": float(l_.mean()), "losses": l_}


def noisy_metadata(rng: np.random.Generator, n_train: int, modality_counts: np.ndarray, n_val: int, val_losses: np.ndarray,
                   z: float, loss_clip: float) -> dict:
    """Gaussian mechanism on (n_train, per-modality counts, n_val, sum of clipped losses / bound).
    A training case moves at most 4 entries by 1, a validation case 2 entries by at most 1: L2
    sensitivity 2, noise std 2 z."""
    v = np.array([n_train, *modality_counts, n_val, np.minimum(val_losses, loss_clip).sum() / loss_clip], dtype=np.float64)
    noisy = v + rng.normal(0.0, 2.0 * z, v.shape)
    n = max(1.0, noisy[0])
    return {
        "n": int(round(n)),
        "modality_fraction": {m: round(float(np.clip(noisy[1 + i] / n, 0.0, 1.0)), 4) for i, m in enumerate(MODALITIES)},
        "val_loss": round(float(np.clip(noisy[-1] * loss_clip / max(noisy[-2], 1.0), 0.0, loss_clip)), 4),
    }


SIGMA_STEP = 0.5  # the released noise multiplier is floored to this grid (accountant.SIGMA_MIN is 0.5)


def released_sigma(sigma: float) -> float:
    """The DP-SGD noise multiplier as the update releases it: floored to SIGMA_STEP, never above the
    real one, so a minimum-noise check on the server stays sound and reveals little of q (and n)."""
    return max(SIGMA_STEP, float(np.floor(sigma / SIGMA_STEP) * SIGMA_STEP))


def train_round(start: Params, *, plan: FinetunePlan, events: RoundEvents, n_train: int, read: dpsgd.ReadBatch,
                rng: np.random.Generator, modality_counts: np.ndarray, n_val: int, val_losses: np.ndarray,
                loss_clip: float, on_step=None) -> tuple[Params, dict]:
    """One clinic round after planning and charging: DP-SGD of the plan's trainable parameters, then
    the metadata release, both from ``rng`` in this order (the federation simulation runs this very
    function, so one simulated round equals one round through `edge-run sync`)."""
    spec = dpsgd.TrainSpec(events.steps, events.sampling_rate, events.noise_multiplier, plan.clip, plan.lr,
                           trainable=tuple(plan.names(start)), optimizer=plan.optimizer)
    new_params = dpsgd.train(start, n_train, read, spec, rng, on_step=on_step)
    meta = noisy_metadata(rng, n_train, modality_counts, n_val, val_losses, events.meta_noise_multiplier, loss_clip)
    return new_params, meta


def update_delta(new_params: Params, start: Params, plan: FinetunePlan) -> Params:
    """What an update carries: the change of the plan's trainable parameters only (float32)."""
    return {k: (new_params[k] - start[k]).astype(np.float32) for k in plan.names(start)}


@dataclass
class LocalSplit:
    """A clinic's labelled cases as rows of its embedding cache, split into training and validation."""

    cache: EmbeddingCache
    train_rows: np.ndarray
    train_labels: np.ndarray
    val_rows: np.ndarray
    val_labels: np.ndarray
    rejected: dict[str, str]
    variant: str
    variant_reason: str
    active: ActiveHead  # the head this clinic runs for the bundle now


def local_split(bundle: Bundle, manifest: Manifest, state: ClinicState, opts: FinetuneOptions, labelled: Labelled,
                log=lambda s: None) -> LocalSplit:
    """Embed the labelled cases not cached yet with the frozen encoders of the variant this PC runs
    (ClinicState.model_for), one case at a time; the stable per-case split (both classes in each part)."""
    start_params, dim, _ = bundle_head(bundle)
    model = state.model_for(bundle, opts.variant, opts.threads)
    cache = EmbeddingCache(state.cache_dir, bundle_encoder_key(bundle.manifest, model.variant), dim, len(MODALITIES), opts.cache_mb)
    if cache.dim != int(start_params["classifier.weight"].shape[1]):
        raise BadInput(f"{cache.folder}: cache embeddings have dimension {cache.dim}, the bundle head expects {dim}")
    if len(labelled.case_ids) > cache.capacity:
        raise BadInput(f"{manifest.path}: {len(labelled.case_ids)} cases do not fit the {opts.cache_mb:g} MB cache; raise --cache-mb")
    row_of, rejected = fill_cache(model, bundle, manifest, cache, set(labelled.case_ids), log)
    keep = [i for i, c in enumerate(labelled.case_ids) if c in row_of]
    ids = [labelled.case_ids[i] for i in keep]
    labels = labelled.labels[keep]
    rows = np.array([row_of[c] for c in ids], dtype=np.int64)
    val = validation_split(state.clinic_id, list(ids), labels, opts.val_fraction)
    split = LocalSplit(cache, rows[~val], labels[~val], rows[val], labels[val], rejected, model.variant, model.variant_reason,
                       model.active_head)
    if len(split.train_rows) < 10 or len(split.val_rows) < 4 or len(np.unique(split.val_labels)) < 2 \
            or len(np.unique(split.train_labels)) < 2:
        cache.close()
        raise BadInput(f"{manifest.path}: too few usable labelled cases ({len(split.train_rows)} training, {len(split.val_rows)} "
                       f"validation, {len(rejected)} rejected) for a round with both classes in each split")
    return split


def score_heads(bundle: Bundle, manifest: Manifest, state: ClinicState, opts: FinetuneOptions, heads: dict[str, Params],
                log=lambda s: None) -> dict:
    """Validation AUC and loss of each head on the clinic's local validation split (the one fine-tuning
    holds out), with ``bundle``'s encoders; nothing is trained, nothing spent."""
    split = local_split(bundle, manifest, state, opts, check_labels(manifest, bundle.classes), log)
    try:
        scores = {name: evaluate(params, split.cache, split.val_rows, split.val_labels) for name, params in heads.items()}
    finally:
        split.cache.close()
    return {"validation_cases": int(len(split.val_rows)),
            **{name: {"auc": round(e["auc"], 4), "loss": round(e["loss"], 4)} for name, e in scores.items()}}


def finetune(bundle: Bundle, manifest: Manifest, state: ClinicState, opts: FinetuneOptions, log=lambda s: None) -> dict:
    opts.check()
    t0 = time.perf_counter()
    labelled = check_labels(manifest, bundle.classes)
    plan = opts.plan(FinetunePlan.of_manifest(bundle.manifest, str(bundle.root)))
    start_params, dim, n_classes = bundle_head(bundle)
    ledger = state.ledger(opts.dataset, epsilon_total=opts.epsilon, delta=opts.delta)  # its own budget and delta
    clinic, eps_total, delta_ = state.clinic_id, ledger.epsilon_total, ledger.delta
    if ledger.spent() >= eps_total - 1e-3:
        raise BudgetSpent(f"privacy budget spent for dataset {opts.dataset!r}: epsilon {ledger.spent():.4f} of {eps_total:g} "
                      f"(delta {delta_:g}); nothing trained, nothing sent")

    # 2-3. embeddings into the cache, the split
    split = local_split(bundle, manifest, state, opts, labelled, log)
    cache, active, variant = split.cache, split.active, split.variant
    tr_rows, tr_labels, va_rows, va_labels, rejected = split.train_rows, split.train_labels, split.val_rows, split.val_labels, split.rejected
    model_reason, t_embed = split.variant_reason, time.perf_counter() - t0
    start_eval = evaluate(start_params, cache, va_rows, va_labels)
    # the head in force before this round (fine-tuned, or the bundle's: head.npz = head.onnx, tested)
    active_eval = evaluate(active.params, cache, va_rows, va_labels) if active.source == "fine-tuned" else start_eval
    modality_counts = cache.read_masks(tr_rows).sum(axis=0)  # masks only: no embedding is loaded for this

    # 4. plan, charge (fsync), train
    try:
        budget = plan_round(ledger.rounds, len(tr_rows), plan.batch_size, plan.epochs, opts.meta_noise,
                            eps_total, delta_, opts.round_epsilon, rounds_left=plan.rounds_left(len(ledger.rounds)))
    except BudgetExhausted as exc:
        raise BudgetSpent(f"{exc}; nothing trained, nothing sent") from exc
    round_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    ledger.open_head()  # first: a dataset registered without a ledger head was deleted, not interrupted
    state.register_dataset(opts.dataset)
    events = budget.events
    ledger.charge(round_id, events)  # fsynced before anything derived from this round exists
    rng = np.random.default_rng(opts.seed)

    def read(idx: np.ndarray):
        emb, mask = cache.read(tr_rows[idx])
        return emb, mask, tr_labels[idx]

    t1 = time.perf_counter()
    with progress(f"DP-SGD ({events.steps} steps)", events.steps) as advance:
        new_params, meta_release = train_round(
            start_params, plan=plan, events=events, n_train=len(tr_rows), read=read, rng=rng, modality_counts=modality_counts,
            n_val=len(va_rows), val_losses=start_eval["losses"], loss_clip=opts.loss_clip, on_step=lambda _s, _i: advance(1))
    t_train = time.perf_counter() - t1

    # 5. update out (atomic), then the local switch
    new_eval = evaluate(new_params, cache, va_rows, va_labels)
    cache.close()
    delta = update_delta(new_params, start_params, plan)
    update_id = f"{clinic}-{round_id}"
    meta = {
        "update_id": update_id, "clinic": clinic, "dataset": opts.dataset, "round_id": round_id,
        "model_version": bundle.model_version, "base_head": bundle_head_key(bundle), **meta_release,
        # q = batch / n_train and the steps would give the server n_train exactly, undoing the noise on
        # n; sigma (a function of q for a given budget) goes out coarsened, enough for the server's
        # minimum-noise check. The exact figures stay in the local report and the ledger.
        "noise_multiplier": released_sigma(events.noise_multiplier), "clip": plan.clip,
        "meta_noise_multiplier": events.meta_noise_multiplier, "delta": delta_, "trainable": plan.trainable,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    update_path = state.write_update(update_id, delta, meta)
    baseline = active_eval["auc"]
    accepted = bool(np.isfinite(new_eval["auc"]) and new_eval["auc"] >= baseline - opts.tolerance)
    if accepted:
        state.activate(bundle, new_params, round_id=round_id, info={"val_auc": round(new_eval["auc"], 4), "base_val_auc": round(baseline, 4)})
    return {
        "update": str(update_path), "update_id": update_id, "round_id": round_id, "clinic": clinic, "dataset": opts.dataset,
        "variant": variant, "variant_reason": model_reason, "encoder_key": cache.key,
        "cases": {"train": int(len(tr_rows)), "validation": int(len(va_rows)), "rejected": len(rejected), "cached": len(cache)},
        "rejected": rejected,
        "validation": {"auc_start": round(start_eval["auc"], 4), "auc_active_before": round(baseline, 4),
                       "auc_new": round(new_eval["auc"], 4), "loss_start": round(start_eval["loss"], 4),
                       "loss_new": round(new_eval["loss"], 4), "tolerance": opts.tolerance},
        "activated": accepted,
        "active_before": active.round_id,
        "privacy": {"noise_multiplier": round(events.noise_multiplier, 4), "sampling_rate": round(events.sampling_rate, 5),
                    "steps": events.steps, "clip": plan.clip, "meta_noise_multiplier": events.meta_noise_multiplier,
                    "epsilon_round": round(epsilon([events], delta_), 6), **ledger.summary()},
        "plan": {**plan.to_dict(), "round": len(ledger.rounds)},
        "released": meta_release,
        "seconds": {"embed": round(t_embed, 2), "train": round(t_train, 2), "total": round(time.perf_counter() - t0, 2)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
