"""The student head in numpy: forward pass and a hand-written backward pass giving one gradient per
example (what DP-SGD clips). Mirrors ``export.models.StudentHead`` exactly:

    t_i   = e_i + relu(A_i e_i + a_i)                         adapter of modality i (residual)
    s_i   = w . (tanh(V t_i + v) * sigmoid(U t_i + u)) + w0   gated attention score
    alpha = softmax(s + (mask - 1) * 1e9)                     absent modalities get weight 0
    f     = sum_i alpha_i t_i;   z = C f + c                  fusion, classifier logits
    loss  = cross-entropy(softmax(z), y)                      per example

Parameters are a dict of arrays under the StudentHead state-dict names (``head.npz`` in the bundle).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BadInput

Params = dict[str, np.ndarray]
MASK_PENALTY = 1e9
N_MODALITIES = 3


def param_shapes(dim: int, n_classes: int, n_modalities: int = N_MODALITIES) -> dict[str, tuple[int, ...]]:
    hidden = dim // 2
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n_modalities):
        shapes[f"adapters.{i}.lin.weight"] = (dim, dim)
        shapes[f"adapters.{i}.lin.bias"] = (dim,)
    for g in ("v", "u"):
        shapes[f"fusion.{g}.weight"] = (hidden, dim)
        shapes[f"fusion.{g}.bias"] = (hidden,)
    shapes["fusion.w.weight"] = (1, hidden)
    shapes["fusion.w.bias"] = (1,)
    shapes["classifier.weight"] = (n_classes, dim)
    shapes["classifier.bias"] = (n_classes,)
    return shapes


def check_params(params: Params, dim: int, n_classes: int, where: str) -> Params:
    """Exactly the expected names and shapes, finite values; BadInput naming ``where`` otherwise."""
    shapes = param_shapes(dim, n_classes)
    if set(params) != set(shapes):
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        raise BadInput(f"{where}: head weights do not match the bundle's head (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise BadInput(f"{where}: head weight {name} has shape {tuple(params[name].shape)}, expected {shape}")
        if not np.all(np.isfinite(params[name])):
            raise BadInput(f"{where}: head weight {name} is not finite")
    return params


def load_params(path: Path, dim: int, n_classes: int) -> Params:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: head weights are unreadable ({exc})") from exc
    return check_params(params_from_bytes(data, str(path)), dim, n_classes, str(path))


# head.npz, one home: float32 arrays under the StudentHead state-dict names, uncompressed npz. The
# export writes it, the clinic reads and writes fine-tuned ones, the server reads and publishes it.
def params_from_bytes(data: bytes, where: str) -> Params:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=np.float32) for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{where}: head weights are unreadable ({exc})") from exc


def l2_norm(delta: Params) -> float:
    """L2 norm of a whole parameter set or delta, summed in float64 (what aggregation clips by)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def params_bytes(params: Params) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in sorted(params.items())})
    return buf.getvalue()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for any x


def forward(params: Params, emb: np.ndarray, mask: np.ndarray, keep: bool = False):
    """Logits (B, C) for embeddings (B, M, d) and mask (B, M); with ``keep`` also the cache the
    backward pass needs."""
    dt = np.result_type(emb.dtype, params["classifier.weight"].dtype)
    emb, mask = emb.astype(dt, copy=False), mask.astype(dt, copy=False)
    n_mod = emb.shape[1]
    pre = np.stack([emb[:, i] @ params[f"adapters.{i}.lin.weight"].T + params[f"adapters.{i}.lin.bias"] for i in range(n_mod)], 1)
    tokens = emb + np.maximum(pre, 0.0)
    gv = np.tanh(tokens @ params["fusion.v.weight"].T + params["fusion.v.bias"])
    gu = _sigmoid(tokens @ params["fusion.u.weight"].T + params["fusion.u.bias"])
    gate = gv * gu
    scores = gate @ params["fusion.w.weight"][0] + params["fusion.w.bias"][0] + (mask - 1.0) * MASK_PENALTY
    scores = scores - scores.max(axis=1, keepdims=True)
    alpha = np.exp(scores)
    alpha /= alpha.sum(axis=1, keepdims=True)
    fused = np.einsum("bm,bmd->bd", alpha, tokens)
    logits = fused @ params["classifier.weight"].T + params["classifier.bias"]
    if not keep:
        return logits
    return logits, dict(emb=emb, pre=pre, tokens=tokens, gv=gv, gu=gu, gate=gate, alpha=alpha, fused=fused)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def losses(params: Params, emb: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy per example."""
    logits = forward(params, emb, mask)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def per_example_grads(params: Params, emb: np.ndarray, mask: np.ndarray, labels: np.ndarray,
                      names: Sequence[str] | None = None) -> tuple[np.ndarray, Params]:
    """Per-example losses (B,) and gradients {name: (B, *shape)} of each example's own loss; with
    ``names``, the backward pass stops once those are done (the classifier alone needs no more)."""
    logits, c = forward(params, emb, mask, keep=True)
    b = len(labels)
    dz = softmax(logits)
    losses_ = -np.log(np.maximum(dz[np.arange(b), labels], 1e-300))
    dz[np.arange(b), labels] -= 1.0  # d loss_b / d logits_b
    g: Params = {"classifier.weight": dz[:, :, None] * c["fused"][:, None, :], "classifier.bias": dz}
    wanted = set(params) if names is None else set(names)
    if wanted <= set(g):
        return losses_, g
    dfused = dz @ params["classifier.weight"]  # (B, d)
    tokens, alpha = c["tokens"], c["alpha"]
    dalpha = np.einsum("bd,bmd->bm", dfused, tokens)
    dtokens = alpha[:, :, None] * dfused[:, None, :]
    dscores = alpha * (dalpha - (alpha * dalpha).sum(axis=1, keepdims=True))
    g["fusion.w.weight"] = np.einsum("bm,bmk->bk", dscores, c["gate"])[:, None, :]
    g["fusion.w.bias"] = dscores.sum(axis=1)[:, None]
    dgate = dscores[:, :, None] * params["fusion.w.weight"][0]
    gv, gu = c["gv"], c["gu"]
    dv = dgate * gu * (1.0 - gv * gv)
    du = dgate * gv * gu * (1.0 - gu)
    for name, d in (("v", dv), ("u", du)):
        g[f"fusion.{name}.weight"] = np.einsum("bmk,bmd->bkd", d, tokens)
        g[f"fusion.{name}.bias"] = d.sum(axis=1)
        dtokens += d @ params[f"fusion.{name}.weight"]
    if wanted <= set(g):
        return losses_, g
    dpre = dtokens * (c["pre"] > 0)
    for i in range(tokens.shape[1]):
        g[f"adapters.{i}.lin.weight"] = dpre[:, i, :, None] * c["emb"][:, i, None, :]
        g[f"adapters.{i}.lin.bias"] = dpre[:, i]
    return losses_, g
