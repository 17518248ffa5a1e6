"""How far an engine's outputs are from the PyTorch fp32 reference: the product's key number.

Numpy only, so the runtime, the exporter and every engine report parity the same way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    max_abs: float  # largest absolute difference over all elements
    max_rel: float  # max_abs divided by the reference's largest magnitude
    cosine: float  # lowest per-sample cosine similarity
    top1_agreement: float | None  # fraction of samples with the same arg-max (logits only)
    top5_agreement: float | None  # fraction whose reference top-1 is in the candidate's top-5

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        text = f"max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, cosine {self.cosine:.6f}"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text


def compare(reference: np.ndarray, candidate: np.ndarray, classify: bool = True) -> Parity:
    """Compare two (batch, ...) arrays; ``classify`` adds top-1/top-5 agreement for logits."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    max_abs = float(np.abs(ref - out).max())
    scale = float(np.abs(ref).max()) or 1.0
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cosine = float(np.min(np.sum(ref * out, axis=1) / np.where(norms == 0, 1.0, norms)))
    top1 = top5 = None
    if classify:
        ref_top1 = ref.argmax(axis=1)
        top1 = float(np.mean(ref_top1 == out.argmax(axis=1)))
        k = min(5, out.shape[1])
        top5 = float(np.mean([r in row for r, row in zip(ref_top1, np.argsort(-out, axis=1)[:, :k])]))
    return Parity(max_abs, max_abs / scale, cosine, top1, top5)
