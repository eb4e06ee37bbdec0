"""Teacher and student networks (DESIGN §3), written here: torchvision is not available.

Both take ``inputs`` (modality -> batch tensor, zeros where absent) and ``mask`` (B, 3) with 1 for
present modalities, in MODALITIES order, and return ``(logits, embeddings)`` where embeddings are
the per-modality shared-space vectors (B, 3, dim). Encoders only run on the rows that have their
modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime import MODALITIES

from .config import ModelConfig

# ---------------------------------------------------------------- building blocks


class BasicBlock(nn.Module):
    """ResNet basic block for 2D or 3D inputs."""

    def __init__(self, conv, norm, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1, bias=False), norm(cout)
        nn.init.zeros_(self.bn2.weight)  # zero-init residual: each block starts as its shortcut
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(conv(cin, cout, 1, stride, 0, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck block (2D), expansion 4."""

    expansion = 4

    def __init__(self, conv, norm, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv(cin, width, 1, 1, 0, bias=False), norm(width), nn.ReLU(inplace=True),
            conv(width, width, 3, stride, 1, bias=False), norm(width), nn.ReLU(inplace=True),
            conv(width, cout, 1, 1, 0, bias=False), norm(cout),
        )
        nn.init.zeros_(self.body[-1].weight)  # zero-init residual
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(conv(cin, cout, 1, stride, 0, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """A ResNet trunk ending in global average pooling; ``ndim`` 2 or 3."""

    def __init__(
        self, ndim: int, in_ch: int, widths: tuple[int, ...], blocks: tuple[int, ...], bottleneck: bool, max_pool: bool = False
    ) -> None:
        super().__init__()
        self.max_pool = max_pool
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if ndim == 3 else (nn.Conv2d, nn.BatchNorm2d)
        stem = widths[0]
        self.stem = nn.Sequential(conv(in_ch, stem, 3, 2, 1, bias=False), norm(stem), nn.ReLU(inplace=True))
        layers, cin = [], stem
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if j == 0 else 1
                if bottleneck:
                    layers.append(Bottleneck(conv, norm, cin, width, stride))
                    cin = width * Bottleneck.expansion
                else:
                    layers.append(BasicBlock(conv, norm, cin, width, stride))
                    cin = width
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin * (2 if max_pool else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.layers(self.stem(x)), self.max_pool)


def global_pool(x: torch.Tensor, with_max: bool) -> torch.Tensor:
    """Global average pooling, optionally concatenated with global max pooling: a small lesion is
    diluted away by an average over a whole volume but stands out in the maximum."""
    flat = x.flatten(2)
    return torch.cat([flat.mean(-1), flat.amax(-1)], 1) if with_max else flat.mean(-1)


class SNN(nn.Module):
    """Self-normalizing MLP (SELU, LeCun-normal init, alpha dropout) for expression vectors."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], dropout: float = 0.3, input_dropout: float = 0.5) -> None:
        super().__init__()
        # Input dropout over genes: thousands of inputs and a few hundred cases overfit in one epoch
        # without it (measured: validation AUC 0.79 -> 0.72 by epoch 8; with it, flat at 0.79).
        layers, cin = [nn.AlphaDropout(input_dropout)] if input_dropout else [], n_in
        for h in hidden:
            lin = nn.Linear(cin, h)
            nn.init.normal_(lin.weight, 0.0, cin**-0.5)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.SELU(), nn.AlphaDropout(dropout)]
            cin = h
        self.net = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DSConv(nn.Module):
    """Depthwise-separable convolution (MobileNet style), 2D or 3D."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if ndim == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.net = nn.Sequential(
            conv(cin, cin, 3, stride, 1, groups=cin, bias=False), norm(cin), nn.ReLU6(inplace=True),
            conv(cin, cout, 1, 1, 0, bias=False), norm(cout), nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StudentConvEncoder(nn.Module):
    """Strided stem, depthwise-separable stages, global pooling, projection to the shared space."""

    def __init__(self, ndim: int, in_ch: int, widths: tuple[int, ...], dim: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if ndim == 3 else (nn.Conv2d, nn.BatchNorm2d)
        layers = [conv(in_ch, widths[0], 3, 2, 1, bias=False), norm(widths[0]), nn.ReLU6(inplace=True)]
        for cin, cout in zip(widths, widths[1:]):
            layers.append(DSConv(ndim, cin, cout, 2))
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(widths[-1] * (2 if max_pool else 1), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(global_pool(self.trunk(x), self.max_pool))


class GatedAttentionFusion(nn.Module):
    """Gated attention (Ilse et al. 2018) over the present modality tokens; absent ones get weight 0."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.v(tokens)) * torch.sigmoid(self.u(tokens))).squeeze(-1)
        # Additive mask instead of masked_fill: exports to plain ONNX arithmetic.
        weights = torch.softmax(scores + (mask - 1.0) * 1e9, dim=-1)
        return (weights.unsqueeze(-1) * tokens).sum(1), weights


def _encode(encoder: nn.Module, x: torch.Tensor, present: torch.Tensor, dim: int) -> torch.Tensor:
    """Run ``encoder`` only on rows whose modality is present; zeros elsewhere."""
    out = x.new_zeros(x.shape[0], dim)
    idx = present.nonzero(as_tuple=True)[0]
    if idx.numel():
        out[idx] = encoder(x[idx])
    return out


# ---------------------------------------------------------------- teacher


class AlignmentModule(nn.Module):
    """Projects each encoder's features into the shared space; its contrastive loss pulls the
    modalities of one case together and pushes other cases apart (symmetric InfoNCE)."""

    def __init__(self, in_dims: dict[str, int], dim: int, temperature: float) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for m, d in in_dims.items()})
        self.temperature = temperature

    def forward(self, modality: str, feats: torch.Tensor) -> torch.Tensor:
        return self.proj[modality](feats)

    def loss(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        terms = []
        for a in range(emb.shape[1]):
            for b in range(a + 1, emb.shape[1]):
                both = (mask[:, a] > 0) & (mask[:, b] > 0)
                if both.sum() < 2:
                    continue
                za = F.normalize(emb[both, a], dim=-1)
                zb = F.normalize(emb[both, b], dim=-1)
                logits = za @ zb.T / self.temperature
                target = torch.arange(len(za), device=emb.device)
                terms.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
        return torch.stack(terms).mean() if terms else emb.sum() * 0.0


class Teacher(nn.Module):
    def __init__(self, cfg: ModelConfig, n_genes: int, n_classes: int, temperature: float = 0.2) -> None:
        super().__init__()
        ct_blocks = (1,) * len(cfg.teacher_ct)
        self.encoders = nn.ModuleDict(
            {
                "ct": ResNet(3, 1, cfg.teacher_ct, ct_blocks, bottleneck=False, max_pool=True),
                "pathology": ResNet(2, 3, cfg.teacher_path, cfg.teacher_path_blocks, cfg.teacher_path_bottleneck),
                "genomics": SNN(n_genes, cfg.teacher_gen),
            }
        )
        self.alignment = AlignmentModule({m: e.out_dim for m, e in self.encoders.items()}, cfg.dim, temperature)
        self.fusion = GatedAttentionFusion(cfg.dim, cfg.dim // 2)
        self.classifier = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(cfg.dim, n_classes))
        # Multi-task: an auxiliary risk score regressed from the fused embedding (trained only where
        # a target exists and TrainConfig.aux_weight > 0); it regularises the shared representation.
        self.risk_head = nn.Linear(cfg.dim, 1)
        self.dim = cfg.dim
        self.dense = False  # True: every encoder runs on every row (absent ones are zeros, masked after): DP-SGD's per-case gradients

    def embed(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        embs = []
        for i, m in enumerate(MODALITIES):
            if self.dense:
                feats = self.encoders[m](inputs[m])
            else:
                feats = _encode(self.encoders[m], inputs[m], mask[:, i] > 0, self.encoders[m].out_dim)
            embs.append(self.alignment(m, feats) * mask[:, i : i + 1])
        return torch.stack(embs, 1)

    def fuse(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fused, _ = self.fusion(emb * mask.unsqueeze(-1), mask)
        return fused

    def classify(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from shared-space embeddings of the modalities ``mask`` keeps."""
        return self.classifier(self.fuse(emb, mask))

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(inputs, mask)
        return self.classify(emb, mask), emb


# ---------------------------------------------------------------- student (edge split)


class Adapter(nn.Module):
    """Residual per-modality adapter: what a clinic fine-tunes to its own scanners and labs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        # Near identity, but not exactly: with zero weights every pre-activation is 0, ReLU's
        # gradient there is 0, and the adapter would never train (in distillation or on the clinic).
        nn.init.normal_(self.lin.weight, std=0.01)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.lin(x))


class StudentHead(nn.Module):
    """Per-modality adapters + masked gated fusion + classifier: (B, 3, dim), (B, 3) -> logits."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList([Adapter(dim) for _ in MODALITIES])
        self.fusion = GatedAttentionFusion(dim, dim // 2)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([a(embeddings[:, i]) for i, a in enumerate(self.adapters)], 1)
        fused, _ = self.fusion(tokens, mask)
        return self.classifier(fused)


class Student(nn.Module):
    def __init__(self, cfg: ModelConfig, n_genes: int, n_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                "ct": StudentConvEncoder(3, 1, cfg.student_ct, cfg.dim, max_pool=True),
                "pathology": StudentConvEncoder(2, 3, cfg.student_path, cfg.dim),
                "genomics": nn.Sequential(
                    nn.Dropout(0.5), nn.Linear(n_genes, cfg.student_gen), nn.ReLU(), nn.Linear(cfg.student_gen, cfg.dim)
                ),
            }
        )
        self.head = StudentHead(cfg.dim, n_classes)
        self.dim = cfg.dim

    def embed(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        embs = [_encode(self.encoders[m], inputs[m], mask[:, i] > 0, self.dim) for i, m in enumerate(MODALITIES)]
        return torch.stack(embs, 1)

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(inputs, mask)
        return self.head(emb, mask), emb


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module, cfg) -> int:
    """FLOPs of one full three-modality case (batch 1), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = cfg.input
    inputs = {"ct": torch.zeros(1, 1, *spec.ct_grid), "pathology": torch.zeros(1, 3, spec.tile, spec.tile),
              "genomics": torch.zeros(1, spec.n_genes)}
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(inputs, torch.ones(1, len(MODALITIES)))
    model.train(was_training)
    return int(counter.get_total_flops())
