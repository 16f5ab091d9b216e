"""Stage 1 (calibrate), statistics -- one backward pass over the whole calibration set: G = dL/dW for every target.

L is the mean next-token cross-entropy over all calibration tokens, computed in float32.
The set is processed in micro-batches; each micro-batch's gradient is added to a float32
accumulator (so bf16/fp16 models do not accumulate in 16 bits). No parameter requires gradients:
a small autograd function on each target's output computes g^T x in the backward, so no ``.grad``
is allocated and offloaded weights (``zssvd.runtime.offload``) work unchanged. Optional activation checkpointing wraps every decoder block, which keeps
the model in eval mode (no dropout) unlike Hugging Face's own switch. Covariance hooks may ride
along the same forward (pass a ``CovarianceCollector``). Gated MLPs keep only ``gate`` and ``up`` for
the backward and recompute ``act(gate) * up`` there (``recomputed_gated_products``; bit-identical).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from ..runtime.blockwise import block_order_pass, replaced_forwards
from ..runtime.distributed import (active, counted_windows, is_sharded, padded_share, sum_across_ranks,
                                   sum_scalar_across_ranks, windows_per_rank, world)
from ..runtime.memory import large_blocks_mapped, return_freed_memory, tensor_bytes
from .covariance import CovarianceCollector
from ..io.models import TargetSet, find_blocks
from ..runtime.offload import streamed_blocks
from ..runtime.progress import progress


@dataclass
class GradientResult:
    grads: dict[str, torch.Tensor]  # target name -> float32 (out x in), dL/dW of the mean loss
    loss: float  # mean calibration loss (nats per token)
    tokens: int  # number of predicted tokens (over every rank)
    windows_per_rank: list[int] = field(default_factory=lambda: [0])  # windows each rank processed
    # bytes of float32 gradient sums this rank held: in block order at each block boundary (when the block's
    # gradients are complete, before they go to their owners), in batch order once (all of them, to the end)
    held_bytes: list[int] = field(default_factory=list)
    # the most bytes of statistics (the gradient sums and the covariance collector's sums) held at once
    stat_peak_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """The most bytes of gradient sums this rank held at once during the pass."""
        return max(self.held_bytes, default=0)


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the next-token cross-entropy, in float32 (float64 for float64 models).

    Logits that require gradients go through ``_ChunkedNextTokenLoss``, which never materialises a
    float32 copy, a log-softmax or a full-size temporary of them beside the logits and their gradient.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return _ChunkedNextTokenLoss.apply(logits, ids)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


LOSS_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in float32): the loss's only temporaries


def _loss_chunks(logits: torch.Tensor):
    """(window, first, stop) row ranges of the predicting positions (all but each window's last)."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    for b in range(logits.shape[0]):
        for first in range(0, logits.shape[1] - 1, rows):
            yield b, first, min(first + rows, logits.shape[1] - 1)


class _ChunkedNextTokenLoss(torch.autograd.Function):
    """``F.cross_entropy(logits[:, :-1], ids[:, 1:], reduction="sum")`` a chunk of positions at a time.

    The plain form keeps, beside the logits, a float32 copy of the shifted logits, their
    log-softmax for the backward, and two full-size gradients; for SmolLM2 (vocabulary 49152) at
    4 x 512 tokens that is 1.6 GB more. Here the forward keeps only the logits; the backward
    recomputes each chunk's log-softmax and writes its gradient, from torch's own log-softmax backward,
    into one buffer: the gradients are the plain form's bit for bit; only the summation order of the
    loss value differs.
    """

    @staticmethod
    def forward(ctx, logits, ids):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        for b, first, stop in _loss_chunks(logits):
            total += F.cross_entropy(logits[b, first:stop].to(dtype), ids[b, first + 1:stop + 1], reduction="sum")
        ctx.save_for_backward(logits, ids)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, ids = ctx.saved_tensors
        dtype = torch.promote_types(logits.dtype, torch.float32)
        grad = torch.zeros_like(logits)  # each window's last position predicts nothing
        g = grad_total.to(dtype)
        for b, first, stop in _loss_chunks(logits):
            log_probs = torch.log_softmax(logits[b, first:stop].to(dtype), dim=-1)
            upstream = torch.zeros_like(log_probs)  # the negative log-likelihood's gradient: -g at each target
            upstream[torch.arange(stop - first, device=logits.device), ids[b, first + 1:stop + 1]] = -g
            grad[b, first:stop] = torch.ops.aten._log_softmax_backward_data(upstream, log_probs, -1, dtype)
        return grad, None


class _WeightGradientSink(torch.autograd.Function):
    """Identity on a linear layer's output whose backward adds dL/dW = g^T x to an accumulator.

    Weights never require gradients: the weight tensors may be replaced on every forward (accelerate's
    offload hooks do that) and none is kept alive for the backward, and no parameter ``.grad`` is ever
    allocated. Under activation checkpointing the saved input is recomputed like any other.
    """

    @staticmethod
    def forward(ctx, output, inputs, sink):
        ctx.save_for_backward(inputs)
        ctx.sink = sink
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        _WeightGradientSink.add_product(ctx.sink, grad_output, inputs)
        return grad_output, None, None

    @staticmethod
    def add_product(sink: torch.Tensor, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        """``sink += g^T x`` over every token."""
        g = grad_output.reshape(-1, grad_output.shape[-1])
        x = inputs.reshape(-1, inputs.shape[-1]).to(g.dtype)
        product = g.T @ x
        if product.element_size() > sink.element_size():
            product = product.to(sink.dtype)
        sink += product.to(sink.device)  # a 16-bit product is upcast by the add: half the bytes to move


class _GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` of a gated MLP, saving only ``gate`` and ``up``; the backward recomputes ``act(gate)``.

    Autograd would keep ``act(gate)`` as well, and the down projection's gradient sink the product:
    four MLP-wide tensors per token and block where these two suffice (30% of the saved activations of
    a LLaMA-shaped block). The backward calls the same kernels on the same values as autograd's own
    (``act``'s backward on ``grad * up``, and ``grad * act(gate)``), so the gradients are bit-identical.
    ``shared`` is a dict the down projection's sink also holds: whichever backward runs first (the sink's)
    leaves its recomputed ``act(gate)`` there for the other, so it is computed once per step.
    """

    @staticmethod
    def forward(ctx, gate, up, act, shared):
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.shared = act, shared
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        leaf, activated = ctx.shared.pop("activated", None) or _activated(ctx.act, gate)
        (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad * activated.detach(), None, None


def _activated(act, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, act(leaf))`` on a detached copy of ``gate``, with the graph that ``act``'s backward needs."""
    with torch.enable_grad():
        leaf = gate.detach().requires_grad_(True)
        return leaf, act(leaf)


class _GatedInputGradientSink(torch.autograd.Function):
    """``_WeightGradientSink`` for a layer whose input is ``act(gate) * up``: it recomputes the input in the
    backward from the tensors ``_GatedProduct`` saves anyway, bit for bit, instead of keeping it."""

    @staticmethod
    def forward(ctx, output, gate, up, act, shared, sink):
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.shared, ctx.sink = act, shared, sink
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        gate, up = ctx.saved_tensors
        if "activated" not in ctx.shared:
            ctx.shared["activated"] = _activated(ctx.act, gate)
        leaf, activated = ctx.shared["activated"]
        _WeightGradientSink.add_product(ctx.sink, grad_output, activated.detach() * up)
        return grad_output, None, None, None, None, None


# (product, gate, up, act, shared) while a replaced gated MLP runs its down projection on ``product``
_GATED_INPUT: contextvars.ContextVar = contextvars.ContextVar("zssvd_gated_input", default=None)


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    """Has the parts of ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LLaMA, Mistral, Qwen, Gemma)."""
    return all(isinstance(getattr(module, part, None), torch.nn.Module)
               for part in ("gate_proj", "up_proj", "down_proj")) and callable(getattr(module, "act_fn", None))


def _gated_forward(mlp: torch.nn.Module, original):
    """``mlp``'s forward through ``_GatedProduct``, or ``original`` where nothing will be differentiated."""
    def forward(x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled():
            return original(x, *args, **kwargs)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        shared = {}  # act(gate), recomputed once in the backward for both users (see _GatedProduct)
        product = _GatedProduct.apply(gate, up, mlp.act_fn, shared)
        token = _GATED_INPUT.set((product, gate, up, mlp.act_fn, shared))
        try:
            return mlp.down_proj(product)
        finally:
            _GATED_INPUT.reset(token)
    return forward


@torch.no_grad()
def _computes_gated_product(mlp: torch.nn.Module) -> bool:
    """Whether ``mlp``'s forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, checked on two
    random tokens: a model whose MLP scales, gates or drops out otherwise keeps its own forward, and so
    does one whose projections are not plain linear layers (a compressed model's) or whose weights are
    not plain tensors here (FSDP-sharded DTensors, offloaded meta tensors): they cannot be run alone."""
    parts = [getattr(mlp, part) for part in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) and type(p.weight.data) is torch.Tensor for p in parts):
        return False
    weight = mlp.gate_proj.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return False
    x = torch.randn(1, 2, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(weight)
    gated = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return torch.equal(mlp(x), gated)


@contextlib.contextmanager
def recomputed_gated_products(model: torch.nn.Module):
    """Route every gated MLP of ``model`` through ``_GatedProduct`` while inside (see there).

    Enter it before any statistics hook is attached: the check of each MLP's forward runs the MLP once.
    Forwards set on an instance (accelerate's hooks) are put back on exit.
    """
    mlps = [m for m in model.modules() if _is_gated_mlp(m) and _computes_gated_product(m)]
    with replaced_forwards(mlps, lambda index, forward: _gated_forward(mlps[index], forward)):
        yield len(mlps)


@contextlib.contextmanager
def weight_gradient_sinks(model: torch.nn.Module, targets: TargetSet, sinks: dict[str, torch.Tensor]):
    """Accumulate dL/dW of every target into ``sinks`` (float32) with no parameter requiring gradients.

    The token embeddings' output is made to require gradients so that autograd builds the graph.
    """
    saved = {name: p.requires_grad for name, p in model.named_parameters()}

    def sink_hook(name):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return output  # a forward that nothing will differentiate (block order's first pass)
            recipe = _GATED_INPUT.get()
            if recipe is not None and recipe[0] is args[0]:  # a gated product: keep its factors, not it
                return _GatedInputGradientSink.apply(output, *recipe[1:], sinks[name])
            return _WeightGradientSink.apply(output, args[0], sinks[name])
        return hook

    def embeddings_hook(module, args, output):
        return output if output.requires_grad else output.detach().requires_grad_(True)

    handles = [t.module.register_forward_hook(sink_hook(t.name)) for t in targets]
    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_hook))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, False))


@contextlib.contextmanager
def checkpointed_blocks(model: torch.nn.Module, blocks_path: str, enabled: bool):
    """Run each decoder block under non-reentrant activation checkpointing.

    Wraps whatever ``forward`` the block has now (accelerate's offload hooks included, so a
    recomputed block loads its weights again) and puts it back afterwards.
    """
    if not enabled:
        yield
        return
    _, blocks = find_blocks(model, blocks_path)

    def wrap(index, fn):
        def run(*args, **kwargs):
            # Recompute whole blocks: with early stopping an offloaded block's post-forward hook would
            # never run in the backward and its weights would stay on the device.
            with set_checkpoint_early_stop(False):
                return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return run

    with replaced_forwards(blocks, wrap):
        yield


def calibration_pass(model: torch.nn.Module, targets: TargetSet, input_ids: torch.Tensor, *,
                     micro_batch: int = 4, covariances: CovarianceCollector | None = None,
                     checkpointing: bool = False, offload: str | None = None,
                     device: torch.device | str | None = None, grad_device: torch.device | str | None = None,
                     order: str = "batch", segment: int | None = None,
                     desc: str = "gradient pass", owners: Mapping[str, int] | None = None) -> GradientResult:
    """Forward + backward over ``input_ids`` (N x L); returns float32 gradients of the mean loss.

    ``order="batch"`` runs each micro-batch through the whole model; ``order="block"`` walks the
    decoder blocks instead and holds one block's statistics on the device at a time (see
    ``zssvd.runtime.blockwise``; ``segment`` is its stored-boundary spacing, chosen from host memory if None;
    its gradients are returned in CPU memory unless ``grad_device`` says otherwise).
    ``offload`` ("cpu" or a folder) keeps the decoder blocks' weights off ``device`` and streams one
    block at a time to it (see ``zssvd.runtime.offload``); the gradients then accumulate in CPU memory, as
    they do with ``grad_device="cpu"`` (for models whose float32 gradients would not fit beside them).
    In batch order, offloading implies activation checkpointing: otherwise autograd would keep every
    block's loaded weights alive for the backward.

    Under torchrun the ranks' sums are added up: by default every rank gets every gradient and
    covariance; with ``owners`` (target name -> rank, ``distributed.owners_by_input_group``) a target's
    gradient and its input group's covariance go to its owner only, and the result holds only this
    rank's own (the loss and token counts reach every rank); ``owners={}`` sums no gradient at all.

    When: the block order reduces each block's gradients to their owners as soon as that block's backward
    is done for every window (``_GradientsToOwners``; the covariances likewise when its forward is done),
    so a rank holds its own gradients and one block's others instead of every target's partial sum. The
    batch order reduces after the pass: its every micro-batch's backward adds into every target's sum, so no
    gradient is complete before the last micro-batch is; the covariances are reduced then too.
    """
    if order not in ("batch", "block"):
        raise ValueError(f"order must be 'batch' or 'block', not {order!r}")
    checkpointing = checkpointing or offload is not None
    device = torch.device(device) if device is not None else model_device(model)
    # Under torchrun each rank takes its share of the windows; the loss is divided by the tokens of
    # the whole set on every rank, so the ranks' sums are the one-process statistics. A sharded model's
    # ranks all run as many windows as the largest share, the first ``counted`` of them for real.
    total_windows = input_ids.shape[0]
    total_tokens = total_windows * (input_ids.shape[1] - 1)
    input_ids, counted = padded_share(input_ids, pad=is_sharded(model))
    # Block order: each block's statistics go to their owners as soon as they are final, when every rank
    # runs every block (it has windows, or pads its share); the reductions are collectives in block order.
    per_block_to_owners = owners is not None and order == "block" and active() and \
        (is_sharded(model) or min(windows_per_rank(total_windows)) > 0)
    if covariances is not None and per_block_to_owners:
        covariances.reduce_when_finished(owners)
    grad_device = grad_device or ("cpu" if statistics_on_host(offload, order) else device)
    # Batch order accumulates straight into ``grads``; block order swaps one block's device sinks in and
    # fills ``grads`` a block at a time (``_GradientsToOwners`` may send them to their owners at once).
    grads = {t.name: torch.zeros(t.shape, dtype=torch.float32, device=grad_device) for t in targets} \
        if order == "batch" else {}
    sinks = grads if order == "batch" else {}
    per_block = _GradientsToOwners(targets, owners, reduce=per_block_to_owners)
    kept = {name for name, rank in owners.items() if rank == world()[0]} if per_block_to_owners else None
    was_training = model.training
    model.eval()
    # Offloaded weights are not there to check each MLP's forward against: those MLPs save their product.
    recompute = recomputed_gated_products(model) if offload is None else contextlib.nullcontext()
    try:  # what a step frees goes back to the kernel, not into a fragmenting heap (runtime.memory)
        with large_blocks_mapped(), recompute, weight_gradient_sinks(model, targets, sinks), \
                streamed_blocks(model, targets.blocks_path, device, offload):
            if input_ids.shape[0] == 0:  # more ranks than windows: this one contributes zeros
                loss_total = 0.0
            elif order == "block":
                loss_total = block_order_pass(model, targets, input_ids, micro_batch=micro_batch, device=device,
                                              grad_device=grad_device, sinks=sinks, grads=grads,
                                              covariances=covariances, loss_of=_checked_loss_sum,
                                              segment=segment, desc=desc, total_tokens=total_tokens,
                                              counted=counted, block_done=per_block.block_done, kept=kept)
            else:
                loss_total = _batch_order_pass(model, targets, input_ids, micro_batch, device, covariances,
                                               checkpointing, total_tokens, desc, counted)
    finally:
        model.train(was_training)
        return_freed_memory()  # the pass's last free pages, before the next stage's allocations
    if order == "batch":
        per_block.held_bytes.append(tensor_bytes(grads.values()))
    # The covariance sums only grow during the forwards; those held now were held beside every gradient sum
    # (block order: the covariances are final before the first backward).
    beside = covariances.held_bytes() if covariances is not None else 0
    grads = per_block.finish(grads, grad_device)
    stat_peak = max(covariances.peak_bytes if covariances is not None else 0, beside + per_block.peak_bytes)
    if covariances is not None:
        covariances.sum_across_ranks(owners)
    loss_total = sum_scalar_across_ranks(loss_total)
    return GradientResult(grads=grads, loss=loss_total / total_tokens, tokens=total_tokens,
                          windows_per_rank=windows_per_rank(total_windows), held_bytes=per_block.held_bytes,
                          stat_peak_bytes=stat_peak)


class _GradientsToOwners:
    """The block order's gradients, block by block (``block_order_pass(block_done=...)``).

    With ``reduce`` (torchrun, ``owners`` given, every rank running every block) each block's gradients go to
    their owners as soon as the block's backward is done, and the other ranks drop their partial sums there:
    a rank then holds its own gradients plus the block being finished instead of every target's partial sum
    (``held_bytes`` records how many bytes at each block boundary). Every rank finishes the same blocks in the
    same order, so the reductions (collectives) match. Otherwise the gradients are summed when the pass ends.
    """

    def __init__(self, targets: TargetSet, owners: Mapping[str, int] | None, reduce: bool):
        self.owners, self.reduce = owners, reduce
        self.order = [t.name for t in targets]  # the result's order, whatever order the blocks finish in
        self.shapes = {t.name: t.shape for t in targets}
        self.by_block: dict[int, list[str]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t.name)
        self.done: set[str] = set()  # summed already (owned: the total; others: dropped)
        self.held_bytes: list[int] = []

    @property
    def peak_bytes(self) -> int:
        return max(self.held_bytes, default=0)

    def block_done(self, index: int, grads: dict[str, torch.Tensor]) -> None:
        """Block ``index``'s gradients in ``grads`` are complete on this rank."""
        self.held_bytes.append(tensor_bytes(grads.values()))
        if not self.reduce:
            return
        names = self.by_block.get(index, [])
        needed = [n for n in names if n in self.owners]  # the others are needed nowhere (``owners={}``)
        sum_across_ranks([grads[n] for n in needed], owners=[self.owners[n] for n in needed])
        rank = world()[0]
        for name in names:
            if self.owners.get(name) != rank:
                del grads[name]
        self.done.update(names)

    def finish(self, grads: dict[str, torch.Tensor], grad_device) -> dict[str, torch.Tensor]:
        """The gradients this rank returns, in the targets' order: those not summed per block are summed now
        (a rank that ran no window adds zeros)."""
        missing = [n for n in self.order if n not in grads and n not in self.done]
        for name in missing:
            grads[name] = torch.zeros(self.shapes[name], dtype=torch.float32, device=grad_device)
        if missing:
            self.held_bytes.append(tensor_bytes(grads.values()))
        rest = _summed_for_owners({n: grads[n] for n in self.order if n not in self.done}, self.owners)
        return {n: rest[n] if n in rest else grads[n] for n in self.order
                if n in rest or (n in self.done and n in grads)}


def _summed_for_owners(grads: dict[str, torch.Tensor], owners: Mapping[str, int] | None) -> dict[str, torch.Tensor]:
    """Every rank's gradients added up, on every rank or (``owners``) on each gradient's owner only: the
    others drop their partial sums here, so a rank keeps about 1/world_size of the gradients. A target
    missing from ``owners`` is needed nowhere (the curvature pass reads no gradient): it is not summed."""
    if owners is None or not active():
        sum_across_ranks(list(grads.values()))
        return grads
    needed = {name: g for name, g in grads.items() if name in owners}
    sum_across_ranks(list(needed.values()), owners=[owners[name] for name in needed])
    rank = world()[0]
    return {name: g for name, g in needed.items() if owners[name] == rank}


def statistics_on_host(offload: str | None, order: str) -> bool:
    """Whether statistics belong in host memory by default: with offloaded weights or in block order."""
    return offload is not None or order == "block"


def _batch_order_pass(model, targets, input_ids, micro_batch, device, covariances, checkpointing,
                      total_tokens, desc, counted) -> float:
    loss_total = 0.0
    collect = covariances if covariances is not None else contextlib.nullcontext()
    with collect, checkpointed_blocks(model, targets.blocks_path, checkpointing):
        for start in progress(range(0, input_ids.shape[0], micro_batch), desc=desc, unit="batch"):
            ids = input_ids[start:start + micro_batch].to(device)
            real = counted_windows(start, ids.shape[0], counted)  # the rest is padding (``padded_share``)
            if covariances is not None:
                covariances.new_batch(real, ids.shape[0])
            logits = model(ids, use_cache=False).logits
            if covariances is not None:
                covariances.check()  # names the first layer whose input went non-finite
            # Padding windows stay out of the loss, so no gradient reaches them: zeros through the
            # whole backward, which still runs (and gathers every sharded block) on every rank.
            loss_sum = _checked_loss_sum(logits[:real], ids[:real], first=start)
            del logits  # the graph holds it until the backward frees it: not beside the next micro-batch's
            (loss_sum / total_tokens).backward()
            loss_total += loss_sum.item()
    return loss_total


def _checked_loss_sum(logits: torch.Tensor, ids: torch.Tensor, first: int) -> torch.Tensor:
    loss_sum = next_token_loss_sum(logits, ids)
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"non-finite calibration loss in samples {first}..{first + len(ids) - 1}: the model "
            "overflows in its dtype (try --dtype float32) or its weights contain NaN/Inf"
        )
    return loss_sum


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, input_ids: torch.Tensor, micro_batch: int = 4, *,
                     offload: str | None = None, device: torch.device | str | None = None,
                     blocks_path: str | None = None) -> float:
    """Mean next-token loss over the calibration windows (no gradients)."""
    device = torch.device(device) if device is not None else model_device(model)
    total, count = 0.0, 0
    with streamed_blocks(model, blocks_path, device, offload):
        for start in range(0, input_ids.shape[0], micro_batch):
            ids = input_ids[start:start + micro_batch].to(device)
            total += next_token_loss_sum(model(ids, use_cache=False).logits, ids).item()
            count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count
