"""Stage 5 -- one backward pass over the whole calibration set: G = dL/dW for every target.

L is the mean next-token cross-entropy over all calibration tokens, computed in float32.
The set is processed in micro-batches; each micro-batch's gradient is added to a float32
accumulator (so bf16/fp16 models do not accumulate in 16 bits), and only target weights
require gradients. Optional activation checkpointing wraps every decoder block, which keeps
the model in eval mode (no dropout) unlike Hugging Face's own switch. Covariance hooks may ride
along the same forward (pass a ``CovarianceCollector``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .covariance import CovarianceCollector
from .models import TargetSet, find_blocks
from .progress import progress


@dataclass
class GradientResult:
    grads: dict[str, torch.Tensor]  # target name -> float32 (out x in), dL/dW of the mean loss
    loss: float  # mean calibration loss (nats per token)
    tokens: int  # number of predicted tokens


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the next-token cross-entropy, in float32 (float64 for float64 models)."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@contextlib.contextmanager
def only_targets_require_grad(model: torch.nn.Module, targets: TargetSet):
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in targets:
            t.module.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, blocks_path: str, enabled: bool):
    """Run each decoder block under non-reentrant activation checkpointing."""
    if not enabled:
        yield
        return
    _, blocks = find_blocks(model, blocks_path)
    originals = [block.forward for block in blocks]

    def wrap(fn):
        return lambda *args, **kwargs: checkpoint(fn, *args, use_reentrant=False, **kwargs)

    try:
        for block, fn in zip(blocks, originals):
            block.forward = wrap(fn)
        yield
    finally:
        for block in blocks:
            del block.forward  # drop the instance attribute: the class's forward is back


def calibration_pass(model: torch.nn.Module, targets: TargetSet, input_ids: torch.Tensor, *,
                     micro_batch: int = 4, covariances: CovarianceCollector | None = None,
                     checkpointing: bool = False, desc: str = "gradient pass") -> GradientResult:
    """Forward + backward over ``input_ids`` (N x L); returns float32 gradients of the mean loss."""
    device = next(model.parameters()).device
    total_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    grads = {t.name: torch.zeros(t.shape, dtype=torch.float32, device=device) for t in targets}
    loss_total = 0.0
    collect = covariances if covariances is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with only_targets_require_grad(model, targets), collect, \
                checkpointed_blocks(model, targets.blocks_path, checkpointing):
            for start in progress(range(0, input_ids.shape[0], micro_batch), desc=desc, unit="batch"):
                ids = input_ids[start:start + micro_batch].to(device)
                if covariances is not None:
                    covariances.new_batch()
                loss_sum = next_token_loss_sum(model(ids, use_cache=False).logits, ids)
                if not torch.isfinite(loss_sum):
                    raise FloatingPointError(
                        f"non-finite calibration loss in samples {start}..{start + len(ids) - 1}: the model "
                        "overflows in its dtype (try --dtype float32) or its weights contain NaN/Inf"
                    )
                (loss_sum / total_tokens).backward()
                loss_total += loss_sum.item()
                for t in targets:
                    grads[t.name] += t.module.weight.grad.float()
                    t.module.weight.grad = None
    finally:
        model.train(was_training)
    return GradientResult(grads=grads, loss=loss_total / total_tokens, tokens=total_tokens)


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, input_ids: torch.Tensor, micro_batch: int = 4) -> float:
    """Mean next-token loss over the calibration windows (no gradients)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], micro_batch):
        ids = input_ids[start:start + micro_batch].to(device)
        total += next_token_loss_sum(model(ids, use_cache=False).logits, ids).item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count
