"""Closed-form linear algebra that every kind's calibration shares (each kind's own fit lives in its folder,
``kinds/<kind>/fit.py``).

- ``whitened_svd`` / ``whitened_factors``: the rank-r ``U V`` minimising ``E||W x - U V x||^2`` on real
  inputs, with ``C = E[x x^T] = L L^T``: the truncated SVD of ``W L`` mapped back by ``L^-1`` (as in
  SVD-LLM); plain SVD minimises the weight error instead, which real inputs do not care about.
- ``lstsq``: a ridge least-squares fit with an intercept (gates).
- ``fit_threshold``: the score threshold that keeps a share of neurons on average (adaptive masks).
- ``left_energy``: the error energy a Top-k mask leaves on the light path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .kernels import fused_kernel

@contextlib.contextmanager
def linalg_threads(elements: int) -> Iterator[None]:
    """One CPU thread for decompositions of small matrices: LAPACK's threaded SVD on a busy
    2-core machine was measured 100x slower than one thread (256x64: 2.6 s vs 2 ms)."""
    before = torch.get_num_threads()
    if elements < (1 << 22):
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors ``U (out, r)``, ``V (r, in)`` of ``weight`` with ``U V`` its best rank-r fit.

    Computed from the eigendecomposition of the Gram matrix on the smaller side (the top singular
    pairs agree with a full SVD to ~1e-5 relative): 4x faster than ``torch.linalg.svd`` on a
    768x3072 layer, which is what makes converting a 100M-parameter model take seconds.
    """
    w = weight.detach().float()
    out_f, in_f = w.shape
    if rank == 0:
        return weight.new_zeros(out_f, 0), weight.new_zeros(0, in_f)
    wide = in_f >= out_f  # the Gram matrix on the smaller side: (out, out) if wide else (in, in)
    with linalg_threads(w.numel()):
        evals, evecs = torch.linalg.eigh(w @ w.T if wide else w.T @ w)
    sing = evals.flip(0)[:rank].clamp_min(0).sqrt()
    vecs = evecs.flip(1)[:, :rank]
    safe = torch.where(sing > sing.max().clamp_min(1e-30) * 1e-6, sing, torch.ones_like(sing))
    if wide:  # vecs are left singular vectors
        u, vh = vecs, (vecs.T @ w) / safe[:, None]
    else:  # vecs are right singular vectors
        u, vh = (w @ vecs) / safe, vecs.T
    root = sing.sqrt()
    return (u * root).to(weight.dtype), (root[:, None] * vh).to(weight.dtype)


def fit_threshold(scores: torch.Tensor, keep: float) -> float:
    """The score above which ``keep`` of all neurons in ``scores`` (..., out) lie: adaptive masks then
    keep that share on average, more where the scores say the light path is wrong."""
    flat = scores.float().reshape(-1)
    below = min(flat.numel(), max(1, round(flat.numel() * (1 - keep))))
    return float(flat.kthvalue(below).values)


@dataclass
class LayerCalibration:
    """Relative output error of one layer on calibration rows, before and after."""

    path: str
    rows: int
    error_before: float
    error_after: float
    gate: str  # which gate candidate won


LOWRANK_OVERSAMPLE, LOWRANK_ITERS = 16, 4  # randomized SVD: extra directions and power iterations
WhitenedSVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # P, S, Q^T of W L, and L


def whitened_svd(weight: torch.Tensor, x: torch.Tensor, rank: int | None = None) -> WhitenedSVD:
    """The SVD of ``W L`` (``L L^T = E[x x^T]``): every rank's whitened factors truncate it, so the
    layer budget computes it once per layer, not once per rank tried. With ``rank`` well below the
    matrix's size only the leading ``rank + LOWRANK_OVERSAMPLE`` triplets are computed, by randomized
    subspace iteration (``torch.svd_lowrank``): the budget fits a layer's light path at each keep it
    tries, and a full SVD each time was a third of its time on SmolLM2."""
    cov = x.T @ x / x.shape[0]
    scale = cov.diagonal().mean().clamp_min(1e-8)
    eye = torch.eye(cov.shape[0])
    # Fewer rows than features (a few images at 7x7) or dead ReLU channels leave C singular: raise
    # the ridge until it factors; plain SVD (L = identity) is the last resort.
    chol = eye * scale.sqrt()
    for ridge in (1e-4, 1e-3, 1e-2, 1e-1):
        factor, info = torch.linalg.cholesky_ex(cov + eye * ridge * scale)
        if int(info) == 0:
            chol = factor
            break
    target = weight @ chol
    if rank and 4 * (rank + LOWRANK_OVERSAMPLE) <= min(target.shape):
        with torch.random.fork_rng():  # reproducible, and the caller's random stream untouched
            torch.manual_seed(0)
            p, s, q = torch.svd_lowrank(target, q=rank + LOWRANK_OVERSAMPLE, niter=LOWRANK_ITERS)
        return p, s, q.T, chol
    p, s, qh = torch.linalg.svd(target, full_matrices=False)
    return p, s, qh, chol


def whitened_factors(
    weight: torch.Tensor, x: torch.Tensor, rank: int, svd: WhitenedSVD | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V`` minimising ``||W x - U V x||`` over the rows of ``x`` (N, in)."""
    p, s, qh, chol = svd if svd is not None else whitened_svd(weight, x, rank)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    a = root[:, None] * qh[:rank]  # V L = a
    v = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    return u, v


def lstsq(h: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``target ~ h G^T + c``; returns (G, c)."""
    feats = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)
    gram = feats.T @ feats
    gram += torch.eye(gram.shape[0]) * ridge * gram.diagonal().mean().clamp_min(1e-8)
    sol = torch.linalg.solve(gram, feats.T @ target)  # (r + 1, out)
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def left_energy(scores: torch.Tensor, err2: torch.Tensor, k: int, adaptive: bool = False) -> float:
    """Error energy of the neurons Top-k leaves on the light path; scores (G, out), err2 (G, n, out).
    ``adaptive``: the neurons above the threshold that keeps ``k`` per mask on average.

    The layer budget calls this for every option it tries: the C++ selection (when built) took
    6 ms where ``torch.topk`` took 17 ms on 1000 x 1536 scores.
    """
    scores = scores.float().contiguous()
    if adaptive:
        kept = scores > fit_threshold(scores, k / scores.shape[-1])
        return (err2 * ~kept[:, None, :]).sum().item()
    kernel = fused_kernel()
    idx = kernel.top_k_rows(scores, k) if kernel is not None else scores.topk(k, dim=-1).indices
    kept = err2.gather(-1, idx[:, None, :].expand(-1, err2.shape[1], -1).long())
    return (err2.sum() - kept.sum()).item()


