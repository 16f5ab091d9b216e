"""Stages 3a + 5 in block order: the calibration pass with one decoder block's statistics at a time.

``gradients.calibration_pass`` runs each micro-batch through the whole model, so every target's
float32 gradient and float64 covariance stays allocated for the whole pass: at LLaMA-7B that is
26 + 44 GB beside a 13.5 GB bf16 model. This pass turns the two loops around and walks the blocks:

1. forward, one block at a time over all micro-batches, collecting that block's covariances; the
   hidden states entering every ``segment``-th block are kept in host memory;
2. the loss and its gradient with respect to the last block's output, from the model's own head
   (the model runs with pass-through blocks, so final norms and projections are whatever it has);
3. backward, one block at a time from the last: each block is recomputed from its stored input with
   the weight-gradient sinks attached, and the gradient with respect to its input is handed down.
   A segment's inputs are first recomputed from the hidden states stored at its start.

When a block is done its statistics move to ``grad_device`` (host memory by default), so the device
holds the weights, one block's statistics and one micro-batch's activations. With ``segment=1`` the
compute equals activation checkpointing's (two forwards and one backward); longer segments add one
forward of their blocks and need less host memory (chosen automatically from what is available).
On CUDA the hidden states travel on two side streams (``Transfers``): the next micro-batch's while
this one computes. An offloaded block (accelerate) stays loaded for a whole phase (``resident``).

The blocks are called directly with the keyword arguments the model itself gives them (captured
once per micro-batch shape with pass-through blocks), which assumes, as layer-by-layer quantisers
do, that the model's block loop is ``h = block(h, ...)`` with nothing else between blocks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from ..stages.covariance import CovarianceCollector
from ..io.models import TargetSet, find_blocks
from .distributed import counted_windows
from .progress import progress
from .memory import proc_kib_field


@dataclass
class BlockCall:
    """How the model calls a block, apart from the hidden states: the other arguments."""

    args: tuple
    kwargs: dict

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    pass


def _hidden_and_rest(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs)


@contextlib.contextmanager
def replaced_forwards(blocks: nn.ModuleList, make_forward):
    """Give every block ``make_forward(index, current_forward)`` as its forward while inside.

    Instance-level forwards (accelerate's hooks) are put back on exit; blocks without one get their
    class's forward back.
    """
    own = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.forward = make_forward(index, block.forward)
        yield
    finally:
        for block, fn in zip(blocks, own):
            if fn is None:
                del block.forward
            else:
                block.forward = fn


@contextlib.contextmanager
def resident(block: nn.Module):
    """Keep an offloaded block's weights on the device for a whole phase instead of for each call.

    accelerate's hook on the block (``_hf_hook``) loads its weights in ``pre_forward`` and drops them in
    ``post_forward``. In between, the block's own forward (``_old_forward``) runs once per micro-batch
    without reloading, so a block is loaded three times per pass rather than three times per micro-batch.
    A block without an offload hook is left alone.
    """
    hook = getattr(block, "_hf_hook", None)
    if not getattr(hook, "offload", False) or not hasattr(block, "_old_forward"):
        yield
        return
    hook.pre_forward(block)
    try:
        with replaced_forwards([block], lambda index, forward: block._old_forward):
            yield
    finally:
        hook.post_forward(block, None)


def _first_block_call(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor):
    """Run the model up to its first block; return what enters it."""
    captured = {}

    def stop(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return _hidden_and_rest(captured["args"], captured["kwargs"])


class _ModelRunner:
    """Calls into the model's own code around the blocks: embeddings, block arguments, and head."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList):
        self.model = model
        self.blocks = blocks
        self._calls: dict[tuple, list[BlockCall]] = {}
        self._tuple_output: bool | None = None

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, call = _first_block_call(self.model, self.blocks, ids)
        if self._tuple_output is None:  # what a real block returns decides what a pass-through one must
            self._tuple_output = isinstance(self.blocks[0](hidden, *call.args, **call.kwargs), (tuple, list))
        return hidden.detach()

    def _pass_through(self, replacement: torch.Tensor | None = None, record: list | None = None):
        def make(index, _forward):
            def forward(*args, **kwargs):
                hidden, call = _hidden_and_rest(args, kwargs)
                if record is not None:
                    record.append(call)
                if index == 0 and replacement is not None:
                    hidden = replacement
                return (hidden,) if self._tuple_output else hidden
            return forward
        return replaced_forwards(self.blocks, make)

    def calls(self, ids: torch.Tensor) -> list[BlockCall]:
        """The arguments the model passes each block (besides the hidden states), by input shape."""
        key = tuple(ids.shape)
        if key not in self._calls:
            record: list[BlockCall] = []
            with torch.no_grad(), self._pass_through(record=record):
                self.model(ids, use_cache=False)
            if len(record) != len(self.blocks):
                raise RuntimeError(f"the model called {len(record)} of its {len(self.blocks)} blocks once each; "
                                   "the block-order pass needs a plain block loop (use --pass-order batch)")
            self._calls[key] = record
        return self._calls[key]

    def logits(self, ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits when its last block outputs ``last_hidden``."""
        with self._pass_through(replacement=last_hidden):
            return self.model(ids, use_cache=False).logits

    @torch.no_grad()
    def check_plain_loop(self, ids: torch.Tensor, last_hidden: torch.Tensor) -> None:
        """Refuse a model whose own forward differs from calling its blocks one after another.

        Compares the logits of one micro-batch (a small fraction of a forward pass) with the model's
        own; anything the model does between blocks would show here rather than in wrong statistics.
        """
        expected = self.model(ids, use_cache=False).logits.float()
        got = self.logits(ids, last_hidden).float()
        scale = expected.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1.0)
        tolerance = (1e-2 if last_hidden.dtype in (torch.float16, torch.bfloat16) else 1e-4) * scale
        if not torch.allclose(got, expected, rtol=0.0, atol=float(tolerance), equal_nan=True):
            error = (got - expected).abs().max().item()
            raise RuntimeError(f"calling this model's blocks one after another does not reproduce its own forward "
                               f"(logits differ by up to {error:.3g}): it does more between its blocks than "
                               "h = block(h, ...); use --pass-order batch")


class Transfers:
    """Copies of hidden states between host memory and the execution device.

    On CUDA they run on two side streams, one per direction, so that they overlap the blocks'
    compute on the current stream. Events order each copy after the work that produced its source
    and before the work that reads its result, and ``record_stream`` keeps every device buffer alive
    until the stream using it is done. Elsewhere they are plain copies.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.down, self.up = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def to_host(self, t: torch.Tensor):
        """Start copying ``t`` to (pinned) host memory; returns the host tensor and its arrival event."""
        t = t.detach()
        if not self.cuda:
            return t.to("cpu"), None
        produced = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.down):
            self.down.wait_event(produced)
            host = t.to("cpu", non_blocking=True)
            arrived = self.down.record_event()
        t.record_stream(self.down)
        return host, arrived

    def start_to_device(self, host: torch.Tensor, ready):
        """Start copying a host tensor (once ``ready`` has fired) to the device."""
        if not self.cuda:
            return host.to(self.device), None
        with torch.cuda.stream(self.up):
            if ready is not None:
                self.up.wait_event(ready)
            t = host.to(self.device, non_blocking=True)
            arrived = self.up.record_event()
        return t, arrived

    def finish_to_device(self, t: torch.Tensor, arrived) -> torch.Tensor:
        """Make the current stream wait for the copy; a fresh tensor (own autograd state)."""
        if arrived is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(arrived)
            t.record_stream(stream)
        return t.detach()

    def drain(self) -> None:
        """Order everything after the copies still in flight."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_stream(self.down)
            stream.wait_stream(self.up)


class HostStore:
    """Hidden states of every micro-batch at one block boundary, kept in host memory.

    Built from an iterable (a generator, so that each micro-batch leaves the device before the next
    is made); ``each()`` brings them back in order, the next one already on its way.
    """

    def __init__(self, tensors, transfers: Transfers):
        self.transfers = transfers
        self.items = [transfers.to_host(t) for t in tensors]  # (host tensor, arrival event)

    def get(self, index: int) -> torch.Tensor:
        """Micro-batch ``index``'s hidden states on the device."""
        return self.transfers.finish_to_device(*self.transfers.start_to_device(*self.items[index]))

    def each(self):
        """Every micro-batch's hidden states on the device, in order, copying one ahead."""
        pending = self.transfers.start_to_device(*self.items[0]) if self.items else None
        for j in range(len(self.items)):
            current = pending
            if j + 1 < len(self.items):
                pending = self.transfers.start_to_device(*self.items[j + 1])
            yield self.transfers.finish_to_device(*current)

    @property
    def nbytes(self) -> int:
        """Host bytes held; pinned blocks count as torch's caching host allocator sizes them (powers of 2)."""
        sizes = [host.numel() * host.element_size() for host, _ in self.items]
        pinned = bool(self.items) and self.items[0][0].is_pinned()
        return sum(1 << (s - 1).bit_length() if pinned else s for s in sizes)


def available_host_bytes() -> int:
    """Memory the kernel says is available now (Linux); a large number elsewhere."""
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    return available if available is not None else 1 << 50


def statistics_bytes_by_block(targets: TargetSet, kept: Collection[str] | None = None) -> tuple[list[int], list[int]]:
    """Bytes of each block's float64 covariances and float32 gradients; with ``kept`` (target names), only
    those of the targets in it (a group's covariance counts with its leader)."""
    num_blocks = max(t.block for t in targets) + 1
    covs, grads = [0] * num_blocks, [0] * num_blocks
    for t in targets:
        if kept is not None and t.name not in kept:
            continue
        grads[t.block] += 4 * t.shape[0] * t.shape[1]
        if targets.groups.get(t.name):  # the group's leader: one n x n sum per group
            covs[t.block] += 8 * t.shape[1] ** 2
    return covs, grads


def host_peak_bytes(segment: int, boundary: int, covs: list[int], grads: list[int],
                    kept: tuple[list[int], list[int]] | None = None) -> int:
    """Peak host memory of the block-order pass with this segment length, by walking its schedule.

    ``boundary`` is one set of hidden states (all micro-batches at one block boundary); ``covs`` and
    ``grads`` are the host bytes of each block's statistics, which arrive as its forward (covariances)
    and backward (gradients) finish. ``kept`` (covariances, gradients per block; default: all of them) is
    what stays once a block is finished: under torchrun a rank sends the others to their owners then.
    """
    num_blocks, stats, peak = len(covs), 0, 0
    kept_covs, kept_grads = kept if kept is not None else (covs, grads)

    def live(boundaries: int) -> None:
        nonlocal peak
        peak = max(peak, boundaries * boundary + stats)

    stored = 0  # boundaries kept for the backward (a segment's first input)
    for index in range(num_blocks):  # forward: a block's input and output are alive together
        starts_segment = index % segment == 0
        stored += starts_segment
        stats += covs[index]
        live(stored + (not starts_segment) + 1)
        stats -= covs[index] - kept_covs[index]
    live(stored + 2)  # the head: last output and the gradient at it
    for start in reversed(range(0, num_blocks, segment)):
        stored -= 1  # this segment's boundary becomes its first input
        size = min(segment, num_blocks - start)
        live(stored + size + 1)  # the segment's inputs recomputed, beside the upstream gradient
        for index in reversed(range(start, start + size)):
            stats += grads[index]
            live(stored + (index - start + 1) + 2)  # inputs left, upstream and handed-down gradients
            stats -= grads[index] - kept_grads[index]
    return peak


def least_host_peak_bytes(targets: TargetSet, boundary: int) -> int:
    """The host memory the block order needs at least (best segment), statistics kept on the host."""
    covs, grads = statistics_bytes_by_block(targets)
    return min(host_peak_bytes(s, boundary, covs, grads) for s in range(1, len(covs) + 1))


def choose_segment(boundary: int, budget: int, covs: list[int], grads: list[int],
                   kept: tuple[list[int], list[int]] | None = None) -> int:
    """The shortest segment (least recomputation) whose schedule fits in ``budget`` bytes of host memory."""
    peaks = {s: host_peak_bytes(s, boundary, covs, grads, kept) for s in range(1, len(covs) + 1)}
    for s, peak in peaks.items():
        if peak <= budget:
            return s
    need = min(peaks.values())
    raise MemoryError(f"the block-order pass needs at least {need / 2**30:.1f} GiB of host memory for the calibration "
                      f"hidden states and statistics but {max(budget, 0) / 2**30:.1f} GiB are available: use fewer or "
                      "shorter calibration windows, or --pass-order batch")


def block_order_pass(model: nn.Module, targets: TargetSet, input_ids: torch.Tensor, *, micro_batch: int,
                     device: torch.device, grad_device, sinks: dict[str, torch.Tensor],
                     grads: dict[str, torch.Tensor], covariances: CovarianceCollector | None,
                     loss_of, segment: int | None = None, desc: str = "calibration pass",
                     total_tokens: int | None = None, counted: int | None = None,
                     block_done=None, kept: Collection[str] | None = None) -> float:
    """Fill ``grads`` (on ``grad_device``) and ``covariances`` in block order; return the summed loss.

    Each block's covariance sums grow on ``device`` and go to the collector's home when the block is done.

    ``sinks`` is the dict the weight-gradient hooks add into (see ``gradients.weight_gradient_sinks``):
    this function puts one block's device accumulators in it at a time, and moves them into ``grads`` (on
    ``grad_device``) when the block's backward is done for every micro-batch; then it calls
    ``block_done(index, grads)``, if given, which may take them out of ``grads`` (reduced to their owners under
    torchrun, ``gradients._GradientsToOwners``). ``loss_of(logits, ids, first=)``
    returns a micro-batch's summed loss (``first``: the index of its first window, for error messages).
    ``total_tokens`` divides the loss (default: the tokens of ``input_ids``; a data-parallel rank passes
    those of the whole calibration set). Only the first ``counted`` windows (default: all) enter the loss
    and the covariances; the rest is padding that keeps a sharded model's ranks in step
    (``distributed.padded_share``). ``kept`` (target names; default: all) says whose statistics stay here
    once their block is finished, for the host-memory plan (``segment=None``): ``block_done`` and
    ``CovarianceCollector.reduce_when_finished`` send the others to their owners under torchrun.
    """
    _, blocks = find_blocks(model, targets.blocks_path)
    runner = _ModelRunner(model, blocks)
    starts = range(0, input_ids.shape[0], micro_batch)
    batches = [input_ids[start:start + micro_batch] for start in starts]
    total_tokens = total_tokens or input_ids.shape[0] * (input_ids.shape[1] - 1)
    counted = input_ids.shape[0] if counted is None else counted
    real = [counted_windows(start, len(ids), counted) for start, ids in zip(starts, batches)]
    by_block: dict[int, list] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)

    transfers = Transfers(device)
    with torch.no_grad():
        hidden = HostStore((runner.embeddings(ids.to(device)) for ids in batches), transfers)
    if segment is None:  # the statistics count against host memory only if they are kept there
        def on_host(home) -> bool:
            return home is not None and torch.device(home).type == "cpu"

        def counted_bytes(covs: list[int], grads: list[int]) -> tuple[list[int], list[int]]:
            return ([c if covariances is not None and on_host(covariances.home) else 0 for c in covs],
                    [g if on_host(grad_device) else 0 for g in grads])

        covs, grads_bytes = counted_bytes(*statistics_bytes_by_block(targets))
        stay = counted_bytes(*statistics_bytes_by_block(targets, kept))
        segment = choose_segment(hidden.nbytes, int(0.8 * available_host_bytes()), covs, grads_bytes, stay)
    bar = progress(total=2 * len(blocks), desc=desc, unit="block")

    def outputs(index: int, store: HostStore, collect: bool):
        for ids, x, k in zip(batches, store.each(), real):
            if collect and covariances is not None:
                covariances.new_batch(k, len(ids))
            yield runner.calls(ids.to(device))[index](blocks[index], x)

    def forward_block(index: int, store: HostStore, collect: bool) -> HostStore:
        with torch.no_grad(), resident(blocks[index]):
            return HostStore(outputs(index, store, collect), transfers)

    # 1. forward, keeping the inputs of every segment-th block
    boundaries: dict[int, HostStore] = {}
    collect = covariances if covariances is not None else contextlib.nullcontext()
    staged = covariances.staged(device) if covariances is not None else contextlib.nullcontext()
    with collect, staged:
        for index in range(len(blocks)):
            if index % segment == 0:
                boundaries[index] = hidden
            hidden = forward_block(index, hidden, collect=True)
            if covariances is not None:
                covariances.check()
                covariances.send_home({t.group for t in by_block.get(index, [])})
            bar.update(1)

    # 2. the loss and its gradient at the last block's output
    runner.check_plain_loop(batches[0].to(device), hidden.get(0))
    losses = []

    def head_gradients():
        for j, (ids, last, k) in enumerate(zip(batches, hidden.each(), real)):
            ids = ids.to(device)
            last.requires_grad_(True)
            loss_sum = loss_of(runner.logits(ids, last)[:k], ids[:k], first=j * micro_batch)
            (loss_sum / total_tokens).backward()
            losses.append(loss_sum.item())
            yield last.grad

    upstream = HostStore(head_gradients(), transfers)
    del hidden

    # 3. backward, segment by segment from the top
    for start in reversed(range(0, len(blocks), segment)):
        inputs = [boundaries.pop(start)]
        for index in range(start, min(start + segment, len(blocks)) - 1):
            inputs.append(forward_block(index, inputs[-1], collect=False))
        for index in reversed(range(start, start + len(inputs))):
            upstream = _backward_block(blocks[index], index, runner, batches, inputs.pop(), upstream,
                                       by_block.get(index, []), sinks, grads, device, grad_device)
            if block_done is not None:
                block_done(index, grads)
            bar.update(1)
    transfers.drain()
    bar.close()
    return sum(losses)


def _backward_block(block, index, runner, batches, inputs: HostStore, upstream: HostStore, block_targets,
                    sinks, grads, device, grad_device) -> HostStore:
    """Backpropagate ``upstream`` through one block for every micro-batch; gradients of its inputs."""
    for t in block_targets:
        sinks[t.name] = torch.zeros(t.shape, dtype=torch.float32, device=device)

    def input_gradients():
        for ids, x, gradient in zip(batches, inputs.each(), upstream.each()):
            x.requires_grad_(True)
            runner.calls(ids.to(device))[index](block, x).backward(gradient)
            yield x.grad

    with resident(block):
        handed_down = HostStore(input_gradients(), inputs.transfers)
    for t in block_targets:  # allocated now, not for the whole pass: they may leave for their owners at once
        grads[t.name] = sinks.pop(t.name).to(grad_device)
    return handed_down
