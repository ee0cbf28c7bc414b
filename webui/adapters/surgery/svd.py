"""The linear algebra of adapter surgery: turn a weight change ΔW into LoRA factors of a chosen rank by truncated
SVD, and measure what the truncation lost. `extract`, `resize` and `convert` (ops.py) all
end here; they differ only in where ΔW comes from.

    B2, A2, fit = factor_dense(delta, rank=8)             # ΔW (out, in) → B2 (out, k), A2 (k, in)
    B2, A2, fit = factor_lowrank(B, A, scale, energy=0.99) # s·B·A, without ever forming it

Both split the singular values evenly between the factors (B2 = U·√Σ, A2 = √Σ·Vᵀ), so that B2 @ A2 is the
best rank-k approximation of ΔW (Eckart–Young) and a runtime that scales by 1 reproduces it. The error is
measured on the factors as stored (after the cast to the output dtype), not predicted from the spectrum, so the
number printed is the one a user gets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Fit:
    """One layer's outcome: the rank kept, the share of ‖ΔW‖²_F it keeps (Σ kept σ² / Σ σ²), and the relative
    error ‖ΔW − B2·A2‖_F / ‖ΔW‖_F of the stored factors. `sq_norm` and `sq_error` (‖ΔW‖², ‖ΔW − B2·A2‖²) let
    the totals over layers be exact rather than averages of ratios."""

    module: str
    rank: int
    source_rank: int
    energy: float
    rel_error: float
    sq_norm: float
    sq_error: float

    def to_dict(self) -> dict:
        return {"module": self.module, "rank": self.rank, "source_rank": self.source_rank,
                "energy": self.energy, "rel_error": self.rel_error}


def pick_rank(s: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """How many singular values (sorted, descending) to keep: `rank` (capped at how many there are), or the
    fewest whose squares reach the fraction `energy` of the total. At least 1, so every layer keeps a factor."""
    n = int(s.numel())
    if rank is not None:
        return max(1, min(int(rank), n))
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # the first index whose cumulative share reaches the goal (a tolerance: 1.0 must not miss by rounding)
    return max(1, min(n, int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def _fit(module: str, s: torch.Tensor, k: int, source_rank: int, sq_norm: float, sq_error: float,
         total: float | None = None) -> Fit:
    """`total`: Σ σ² when known more precisely than from `s` (‖ΔW‖²_F summed directly)."""
    sq = s.double() ** 2
    total = float(sq.sum()) if total is None else total
    energy = float(sq[:k].sum()) / total if total > 0 else 1.0
    rel = math.sqrt(sq_error / sq_norm) if sq_norm > 0 else 0.0
    return Fit(module, k, source_rank, energy, rel, sq_norm, sq_error)


def _stored_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖ΔW − B·A‖²_F with the factors as they will be stored, in float64 (one product of the layer's size)."""
    return float((delta.double() - b.double() @ a.double()).pow(2).sum())


def factor_dense(delta: torch.Tensor, rank: int | None = None, energy: float | None = None, module: str = "",
                 dtype: torch.dtype = torch.float32, source_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, Fit]:
    """Truncated SVD of a full ΔW (out, in): the factors in `dtype` and their Fit.

    Through the Gram matrix of the shorter side in float64 (G = ΔW·ΔWᵀ, eigh): measured here on a 2048×5632 layer,
    4 s against 50 s for torch.linalg.svd, which matters over the ~150 layers of a 1B model. Squaring costs
    precision only below σ_max·1e-8 (float64), far under anything kept or printed; the exact-rank case (T − B of
    rank ≤ R) still comes back within float rounding, and the printed error is measured on the factors anyway."""
    d = delta.double()
    tall = d.shape[0] > d.shape[1]
    m = d.T if tall else d                          # (short, long)
    lam, vecs = torch.linalg.eigh(m @ m.T)          # ascending
    s = lam.flip(0).clamp_min(0).sqrt()             # singular values, descending
    k = pick_rank(s, rank, energy)
    u = vecs.flip(1)[:, :k]                         # top-k singular vectors of the short side
    proj = u.T @ m                                  # (k, long) = Σ_k V_kᵀ: row norms are the singular values
    root = proj.norm(dim=1).sqrt()
    root = torch.where(root > 0, root, torch.ones_like(root))  # a zero direction stays zero in proj
    left, right = u * root, proj / root[:, None]    # balanced: U√Σ and √Σ Vᵀ
    b, a = (right.T, left.T) if tall else (left, right)
    b, a = b.to(dtype).contiguous(), a.to(dtype).contiguous()
    sq_norm = float(d.pow(2).sum())
    return b, a, _fit(module, s, k, source_rank or min(d.shape), sq_norm, _stored_error(d, b, a), total=sq_norm)


def factor_lowrank(b: torch.Tensor, a: torch.Tensor, scale: float, rank: int | None = None,
                   energy: float | None = None, module: str = "", dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor, Fit]:
    """Truncated SVD of scale·B·A (B (out, r), A (r, in)) without forming the out×in product for the SVD:
    B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), so scale·B·A = Q_b (scale·R_b R_aᵀ) Q_aᵀ, and the SVD of that r×r
    core, rotated back by Q_b and Q_a, is the exact SVD of the product. Cost O((out + in)·r²)."""
    r = a.shape[0]
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    uc, s, vch = torch.linalg.svd(scale * rb @ ra.T)
    u, vh = qb @ uc, vch @ qa.T
    k = pick_rank(s, rank, energy)
    b2, a2 = (t.to(dtype).contiguous() for t in _split(u, s, vh, k))
    # the error of the stored factors, still without the out×in product: ‖X‖²_F of a difference of two low-rank
    # products is expanded through the small Gram matrices
    sq_norm = _lowrank_sq_norm(scale * b.double(), a.double())
    sq_error = max(0.0, _lowrank_sq_diff(scale * b.double(), a.double(), b2.double(), a2.double()))
    return b2, a2, _fit(module, s, k, r, sq_norm, sq_error)


def _lowrank_sq_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖²_F = trace((BᵀB)(AAᵀ))."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def _lowrank_sq_diff(b1, a1, b2, a2) -> float:
    """‖B1·A1 − B2·A2‖²_F = ‖B1A1‖² + ‖B2A2‖² − 2·trace((B1ᵀB2)(A2A1ᵀ))."""
    cross = float(((b1.T @ b2) * (a1 @ a2.T)).sum())
    return _lowrank_sq_norm(b1, a1) + _lowrank_sq_norm(b2, a2) - 2.0 * cross


def totals(fits: list[Fit]) -> dict:
    """Over all layers: the energy kept and the relative error of the whole adapter (Frobenius over every
    layer's ΔW together), and the largest layer error."""
    norm = sum(f.sq_norm for f in fits)
    err = sum(f.sq_error for f in fits)
    kept = sum(f.energy * f.sq_norm for f in fits)  # Σ kept σ² (each layer's Σ σ² is its ‖ΔW‖²)
    return {"layers": len(fits), "rel_error": math.sqrt(err / norm) if norm > 0 else 0.0,
            "energy": kept / norm if norm > 0 else 1.0,
            "max_layer_error": max((f.rel_error for f in fits), default=0.0),
            "ranks": sorted({f.rank for f in fits})}
