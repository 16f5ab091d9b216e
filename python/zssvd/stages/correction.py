"""Stage 6 (correct) -- truncate, correct, re-truncate (the paper's optional correction rounds).

One round, for every factorised matrix with truncated weight W'_k = U_k diag(sigma_k) Z_k^T:

    g   = dL/dW at the truncated model          (one backward over the calibration set)
    dW  = W - W'_k                               (what truncation removed)
    W'' = W'_k + (<g, dW> / <g, g>) g            (minimum-norm step recovering dW's first-order loss change)
    W'_k <- best rank-k approximation of W'' in whitened coordinates (SVD of W'' S)

Gradients near a pretrained solution are close to low rank, so W'' is close to rank k and the
re-truncation loses little. Ranks never change. Matrices kept dense are untouched.

Rounds never make the calibration loss worse: a round whose result has a higher loss than the best
so far is undone and tried again from the best factors with half the step. On SmolLM2-135M at
ratio 0.6, five plain rounds went 4.06 -> 3.96 -> 4.05 -> 3.74 -> 3.73 -> 3.93 (nats): the steps can
overshoot once the factors are far from W. The returned factors are the best ones evaluated.

The step size is chosen per matrix. One step size for the whole model (inner products summed
over all matrices) was tried and is worse: on SmolLM2-135M at ratio 0.6 (dense storage,
WikiText-2 calibration), one round took test perplexity from 95.5 to 78.9 per matrix, but to
101.7 with the global step, whose calibration loss even rose.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .decompose import Factors, whitened_svd
from .gradients import calibration_loss, calibration_pass
from ..io.models import TargetSet
from ..runtime.distributed import is_sharded_tensor, overwrite_shard, share_factors, whole, world
from ..runtime.progress import progress


@dataclass
class CorrectionResult:
    factors: dict[str, Factors]  # the truncated factors with the lowest calibration loss (kept components)
    losses: list[float]  # calibration loss at truncation, then of each round's result
    step_scales: list[float]  # the step scale each round used (halved after a rejected round)

    @property
    def loss(self) -> float:
        """Calibration loss of ``factors``."""
        return min(self.losses)


@dataclass
class _Point:
    loss: float
    factors: dict[str, Factors]
    grads: dict[str, torch.Tensor]


@contextlib.contextmanager
def swapped_weights(targets: TargetSet, weights: dict[str, torch.Tensor]):
    """Temporarily replace target weights (same shapes; tensors or callables making them) and restore the originals.

    A sharded weight (FSDP2) takes its part of the new matrix in place (``distributed.overwrite_shard``)."""
    by_name = targets.by_name()
    undo = []
    try:
        for name, w in weights.items():
            new = w() if callable(w) else w  # a callable is made one matrix at a time
            undo.append(_swap_in(by_name[name].module.weight, new))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _swap_in(weight: torch.Tensor, new: torch.Tensor):
    """Put ``new`` in ``weight``'s place; returns the function that puts the original back."""
    if is_sharded_tensor(weight):
        return overwrite_shard(weight, new)
    original = weight.data
    weight.data = new.to(dtype=original.dtype, device=original.device)
    return lambda: setattr(weight, "data", original)


def correct(model, targets: TargetSet, input_ids: torch.Tensor, truncated: dict[str, Factors],
            whitening: dict[str, torch.Tensor], rounds: int, *, micro_batch: int = 4,
            checkpointing: bool = False, decompose_method: str = "gram", offload: str | None = None,
            device: torch.device | str | None = None, order: str = "batch",
            owners: Mapping[str, int] | None = None) -> CorrectionResult:
    """Run ``rounds`` correction rounds on the factorised matrices in ``truncated``.

    ``whitening`` maps each target's input group to its factor S (as used for the SVD).

    Under torchrun every rank's forward needs every matrix, so every rank holds every factor in
    ``truncated``. With ``owners`` (target name -> rank) each round's gradients go to a matrix's owner only
    (``calibration_pass(owners=...)``), the owner alone corrects it (it alone needs its group's S), and the
    corrected factors then go from their owners to every rank (``share_factors``). Without ``owners`` every
    rank receives every gradient (all-reduce) and corrects every matrix. Either way every rank ends with the
    same factors and losses, those of one process up to summation order.
    """
    by_name = targets.by_name()
    rank = world()[0]
    # only the factorised matrices' gradients are read: the dense ones are summed nowhere
    owners = None if owners is None else {name: owners[name] for name in truncated}
    # The tensors, not copies. A sharded weight's storage takes the swapped-in values (``swapped_weights``):
    # its original is read only outside that context.
    original = {name: by_name[name].module.weight.detach() for name in truncated}
    factors = dict(truncated)
    best: _Point | None = None
    losses: list[float] = []
    scales: list[float] = []
    scale = 1.0
    for round_index in progress(range(rounds), desc="correction rounds", unit="round"):
        with swapped_weights(targets, _reconstructions(factors, original)):
            result = calibration_pass(model, targets, input_ids, micro_batch=micro_batch,
                                      checkpointing=checkpointing, offload=offload, device=device,
                                      order=order, desc=f"correction {round_index + 1} backward", owners=owners)
        losses.append(result.loss)
        if best is None or result.loss < best.loss:
            best = _Point(result.loss, factors, result.grads)
        else:
            scale /= 2  # the last step overshot: retry from the best factors with half of it
        scales.append(scale)
        # Each matrix is corrected by its owner (every rank, without owners); a sharded original is gathered one
        # matrix at a time, every rank taking part in every gather.
        factors = {}
        for name in best.factors:
            full = whole(original[name])
            if owners is None or owners[name] == rank:
                factors[name] = _corrected(best.factors[name], best.grads[name], full,
                                           whitening[by_name[name].group], scale, decompose_method)
        if owners is not None:
            factors = _from_owners(factors, best.factors, owners)
    with swapped_weights(targets, _reconstructions(factors, original)):
        losses.append(calibration_loss(model, input_ids, micro_batch, offload=offload, device=device,
                                       blocks_path=targets.blocks_path))
    if best is not None and losses[-1] >= best.loss:
        factors = best.factors  # the last round did not help: keep the best evaluated factors
    return CorrectionResult(factors=factors, losses=losses, step_scales=scales)


def _from_owners(corrected: dict[str, Factors], previous: dict[str, Factors],
                 owners: Mapping[str, int]) -> dict[str, Factors]:
    """Every matrix's corrected factors on every rank, each from its owner (``corrected`` holds this rank's
    own), where ``previous`` kept them and in ``previous``'s order. A collective."""
    shapes = {name: (f.U.shape[0], f.rank, f.Z.shape[0]) for name, f in previous.items()}
    dtype = next(iter(previous.values())).U.dtype if previous else torch.float32
    shared = share_factors(corrected, shapes, {name: owners[name] for name in previous}, to_all=True, dtype=dtype)
    return {name: shared[name].to(device=f.U.device) for name, f in previous.items()}


def _reconstructions(factors: dict[str, Factors], original: dict[str, torch.Tensor]) -> dict:
    """For ``swapped_weights``: each matrix rebuilt from its factors on its weight's device when swapped in."""
    return {name: (lambda f=f, on=original[name].device: f.to(device=on).reconstruct()) for name, f in factors.items()}


def _corrected(factors: Factors, grad: torch.Tensor, original: torch.Tensor, whitening: torch.Tensor,
               scale: float, decompose_method: str) -> Factors:
    """One truncate-correct-re-truncate step of one matrix, at rank ``factors.rank``.

    Computed in float64 where the original weight is; the factors stay where they were kept.
    """
    on = original.device
    w_trunc = factors.to(device=on).reconstruct().double()
    step = scale * _projected_step(grad.to(on).double(), original.double() - w_trunc)
    full = whitened_svd(w_trunc + step, whitening.to(on), method=decompose_method, out_dtype=factors.U.dtype)
    k = factors.rank
    return Factors(full.U[:, :k], full.sigma[:k], full.Z[:, :k]).to(device=factors.U.device)


def _projected_step(g: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """(<g, dW> / <g, g>) g for one matrix; zero when its gradient vanishes."""
    norm = (g * g).sum()
    if norm == 0:
        return torch.zeros_like(g)
    return ((g * removed).sum() / norm) * g
