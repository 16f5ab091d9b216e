"""Stage 4b (score, optional) -- a second-order term for the scores (strategy ``zero-sum-2nd``).

Removing component i changes a layer's outputs by dy_s = -sigma_i u_i (z_i . x_s) at every
position s. To second order, with the empirical-Fisher / K-FAC approximation of the loss
curvature with respect to the outputs,

    dL_i ~= -sigma_i u_i^T G z_i  +  0.5 sigma_i^2 (1/N) sum_s (u_i . gamma_s)^2 (z_i . x_s)^2
         ~= first-order score     +  0.5 sigma_i^2 u_i^T A u_i,

where gamma_s = N dL/dy_s is the output gradient at position s of the summed loss, A their
(position-mean) outer product, and the input factor (1/N) sum_s (z_i . x_s)^2 = z_i^T C z_i = 1
in whitened coordinates (up to the diagonal shift). The term is never negative: it charges
each removal for the curvature it meets.

u_i^T A u_i needs U, which exists only after the decomposition, so it costs one more gradient
pass; A itself (m x m per matrix) is never formed: each micro-batch's output gradients are
projected on U and their squares summed, O(rank) memory per matrix.

Measured on SmolLM2-135M (WikiText-2 calibration 32 x 512, test perplexity 24 x 512, dense
storage): ratio 0.8: zero-sum 41.44 -> zero-sum-2nd 39.49; ratio 0.6: 95.55 -> 85.18
(bench/selection_variants.py; bench/RESULTS.md has the seeds and ratios).
"""
from __future__ import annotations

import warnings

import torch

from .decompose import Factors
from .gradients import calibration_pass
from ..io.models import TargetSet
from ..runtime.distributed import active, sum_across_ranks


def curvature_terms(model, targets: TargetSet, input_ids: torch.Tensor, factors: dict[str, Factors], *,
                    micro_batch: int = 4, checkpointing: bool = False, offload: str | None = None,
                    device: torch.device | str | None = None, order: str = "batch") -> dict[str, torch.Tensor]:
    """0.5 sigma_i^2 u_i^T A u_i for every component of every target (float64)."""
    sums: dict[str, torch.Tensor | None] = {t.name: None for t in targets}
    bases = {t.name: factors[t.name].U.float() for t in targets}
    block_of = {t.name: t.block for t in targets}
    on_device: dict[str, torch.Tensor] = {}  # copies of one block's bases (the block order visits a block at a time)

    def basis(name: str, device: torch.device) -> torch.Tensor:
        if name not in on_device:
            if any(block_of[other] != block_of[name] for other in on_device):
                on_device.clear()
            on_device[name] = bases[name].to(device)
        return on_device[name]

    def hook(name):
        def on_backward(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
            projected = g @ basis(name, g.device)  # (positions x rank): u_i . dL/dy_s
            squares = projected.double().pow(2).sum(dim=0)
            sums[name] = squares if sums[name] is None else sums[name] + squares  # on the device: no sync
        return on_backward

    handles = [t.module.register_full_backward_hook(hook(t.name)) for t in targets]
    try:
        with warnings.catch_warnings():
            # The first blocks' inputs need no gradient; the hooks still get the outputs' gradients,
            # which is all they use, and torch warns about exactly that.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            # owners={}: this pass reads the output gradients only, so its weight gradients are summed
            # across ranks nowhere (under torchrun that would move every float32 gradient for nothing)
            result = calibration_pass(model, targets, input_ids, micro_batch=micro_batch,
                                      checkpointing=checkpointing, offload=offload, device=device,
                                      order=order, desc="gradient pass (curvature)", owners={})
    finally:
        for handle in handles:
            handle.remove()
    n = result.tokens  # gamma_s = n dL/dy_s, averaged over the n positions: n * sum_s (u . dL/dy_s)^2
    if active():  # each rank summed over its own windows; a rank without windows adds zeros
        totals = [sums[t.name] if sums[t.name] is not None else bases[t.name].new_zeros(bases[t.name].shape[1],
                                                                                         dtype=torch.float64)
                  for t in targets]
        sum_across_ranks(totals)
        sums = {t.name: total for t, total in zip(targets, totals)}
    missing = [name for name, total in sums.items() if total is None]
    if missing:
        raise RuntimeError(f"no output gradient reached {', '.join(missing[:3])} in the curvature pass")
    return {name: 0.5 * factors[name].sigma.double().cpu() ** 2 * n * total.cpu() for name, total in sums.items()}
