"""Stage 1 (calibrate), statistics -- activation covariances C = sum_t x_t x_t^T of every input group.

Each micro-batch's X^T X is formed in float32 by default (float64 matrix products are several
times slower on CPUs and GPUs; the float32 sum over one micro-batch's tokens is accurate to
about 1e-6 relative, far below the whitening's diagonal shift) and added into a float64
accumulator, so the sum over the whole calibration set never loses precision to its length.
``product_dtype=torch.float64`` forms the products in float64 too. Activations of bf16/fp16 models
have at most 10 mantissa bits, which TF32 holds exactly, so their float32 products run on TF32
tensor cores (about 7x the plain float32 rate on an H100) with no loss at all.

A forward pre-hook on the first linear of each input group adds the outer products of the
tokens of each micro-batch; activations are never stored. The hooks can ride along the
gradient pass's own forward (see ``gradients.calibration_pass``), so collecting covariances
costs no extra forward. With activation checkpointing a block's forward runs twice per
micro-batch; ``new_batch`` lets the hook count each group once per micro-batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from ..io.models import TargetSet
from ..runtime.distributed import active, sum_across_ranks, world
from ..runtime.memory import tensor_bytes


@contextlib.contextmanager
def _float32_matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class CovarianceCollector:
    """Accumulates per-group input covariances while attached to a model."""

    def __init__(self, targets: TargetSet, *, device: torch.device | str | None = None,
                 product_dtype: torch.dtype = torch.float32):
        self.targets = targets
        self.product_dtype = product_dtype  # dtype of each micro-batch's X^T X (float64 or float32)
        by_name = targets.by_name()
        self._leaders = {group: by_name[group] for group in targets.groups}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {group: 0 for group in targets.groups}
        self.home = device  # where the sums are kept (None: where the activations are)
        self._device = device  # where they accumulate now (see ``staged``)
        self._seen: set[str] = set()
        self._counted = (1, 1)  # (windows that count, windows) of this micro-batch
        self._finite: dict[str, torch.Tensor] = {}  # group -> device flag, all products so far finite
        self._averaged: set[str] = set()  # groups whose sums ``covariances`` has turned into means
        self._owners: Mapping[str, int] | None = None  # set by ``reduce_when_finished``
        self._reduced: set[str] = set()  # groups already reduced to their owners (block order, torchrun)
        self.peak_bytes = 0  # the most bytes of sums this collector held at once
        self._handles = []

    def __enter__(self):
        for group, target in self._leaders.items():
            self._handles.append(target.module.register_forward_pre_hook(self._hook(group)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def new_batch(self, counted: int = 1, windows: int = 1) -> None:
        """Call before each micro-batch: a recomputed forward (checkpointing) must not count twice.

        Only the first ``counted`` of its ``windows`` windows count (the others pad a sharded model's
        ranks to equal micro-batch counts, ``distributed.padded_share``); by default all of them.
        """
        self._seen.clear()
        self._counted = (counted, windows)

    def _hook(self, group: str):
        def hook(module, args):
            if group in self._seen:
                return
            if self._averaged:
                raise RuntimeError("covariances() already turned the sums into means: collect with a new "
                                   "CovarianceCollector")
            self._seen.add(group)
            x = args[0].detach()
            exact_in_tf32 = x.dtype in (torch.float16, torch.bfloat16) and self.product_dtype == torch.float32
            x = x.reshape(-1, x.shape[-1])
            counted, windows = self._counted  # the rows are window-major, flattened by the model (OPT) or not
            x = x[:x.shape[0] * counted // windows].to(self.product_dtype)
            with _float32_matmul_precision("high" if exact_in_tf32 else "highest"):
                product = x.T @ x  # kept in its own dtype: the float64 sum upcasts it exactly, and a copy
                # to a statistics device moves half the bytes
            # Non-finite inputs give a non-finite product. The flag stays on the device until check():
            # a host sync per layer would stall the GPU's queue.
            finite = torch.isfinite(product).all()
            self._finite[group] = finite if group not in self._finite else self._finite[group] & finite
            if group not in self.sums:
                device = self._device or product.device
                self.sums[group] = torch.zeros_like(product, dtype=torch.float64, device=device)
                self.peak_bytes = max(self.peak_bytes, self.held_bytes())
            self.sums[group] += product.to(self.sums[group].device)
            self.tokens[group] += x.shape[0]

        return hook

    def check(self) -> None:
        """Raise if any activations recorded so far were NaN/Inf (one host sync for all groups)."""
        if not self._finite:
            return
        groups = list(self._finite)
        device = self._finite[groups[0]].device
        flags = torch.stack([self._finite[g].to(device) for g in groups]).cpu()
        bad = [g for g, ok in zip(groups, flags.tolist()) if not ok]
        if bad:
            raise FloatingPointError(
                f"non-finite activations enter {', '.join(bad[:3])}: the model overflows in its dtype "
                "(try --dtype float32) or its weights contain NaN/Inf"
            )

    @contextlib.contextmanager
    def staged(self, device):
        """Accumulate on ``device`` while inside, whatever the home; ``send_home`` moves finished groups.

        The block order does this: a block's sums grow on the GPU, then leave for host memory at once.
        """
        self._device = device
        try:
            yield
        finally:
            self._device = self.home

    def send_home(self, groups) -> None:
        """Move the sums of finished ``groups`` (e.g. one block's) home, freeing their memory here; after
        ``reduce_when_finished`` they are reduced to their owners at once (a collective)."""
        for group in groups:
            if group in self.sums and self.home is not None:
                self.sums[group] = self.sums[group].to(self.home)
        if self._owners is not None:
            finished = set(groups)  # in the collector's order: a set's order differs between processes
            self._reduce_to_owners([g for g in self._leaders if g in finished and g not in self._reduced])

    def reduce_when_finished(self, owners: Mapping[str, int]) -> None:
        """Under torchrun, reduce each group's sums to the owner of its matrices (target name -> rank) as soon
        as ``send_home`` says they are final, and drop them on the other ranks: the block order then holds its
        own groups and one block's others instead of every group's partial sums until the pass ends. Every
        rank must finish the same groups in the same order (every rank runs every block)."""
        if active():
            self._owners = owners

    def held_bytes(self) -> int:
        """Bytes of sums this collector holds now."""
        return tensor_bytes(self.sums.values())

    def _reduce_to_owners(self, groups: list[str]) -> None:
        """Reduce ``groups`` to their owners; the other ranks drop them (a rank that saw no windows adds zeros)."""
        self._zeros_for_missing(groups)
        owner = [self._owners[self._leaders[g].name] for g in groups]
        sum_across_ranks([self.sums[g] for g in groups], owners=owner)
        rank = world()[0]
        for group, dst in zip(groups, owner):
            if dst != rank:
                del self.sums[group]
        self._reduced.update(groups)

    def _zeros_for_missing(self, groups: list[str]) -> None:
        """Zero sums for the ``groups`` this rank saw no activations of, so that every rank reduces the same."""
        for group in groups:
            if group not in self.sums:
                width = self._leaders[group].shape[1]
                self.sums[group] = torch.zeros(width, width, dtype=torch.float64, device=self.home or "cpu")

    def sum_across_ranks(self, owners: Mapping[str, int] | None = None) -> None:
        """Under torchrun: add up every rank's sums and token counts.

        Without ``owners`` every rank gets every total; with ``owners`` (target name -> rank) a group's
        total goes to the owner of its matrices only and the other ranks drop their partial sums of it,
        keeping about 1/world_size of the covariances (groups ``reduce_when_finished`` reduced already are
        not reduced again). The token counts (one number per group) reach every rank.
        """
        if not active():
            return
        groups = list(self._leaders)
        if owners is None:
            self._zeros_for_missing(groups)
            sum_across_ranks([self.sums[g] for g in groups])
        else:
            self._owners = owners
            self._reduce_to_owners([g for g in groups if g not in self._reduced])
        tokens = torch.tensor([self.tokens[g] for g in groups], dtype=torch.float64)
        sum_across_ranks([tokens])
        self.tokens = {g: int(n) for g, n in zip(groups, tokens.tolist())}

    def covariances(self) -> dict[str, torch.Tensor]:
        """Mean covariance per group, C = X^T X / tokens (float64); this ends the collection.

        The sums are divided in place: a copy would hold a second set of float64 matrices (0.8 GB
        for SmolLM2-135M, 8.6 GB for LLaMA-7B) at the end of the pass.
        """
        self.check()
        missing = [g for g, n in self.tokens.items() if n == 0]
        if missing:
            raise RuntimeError(f"no activations were recorded for {', '.join(missing[:5])}")
        for g, s in self.sums.items():
            if g not in self._averaged:
                s.div_(self.tokens[g])
                self._averaged.add(g)
        return dict(self.sums)
