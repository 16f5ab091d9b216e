"""Several processes (``torchrun``): the calibration data and the whitened SVDs shared out across ranks.

Data parallel calibration: every gradient pass over the calibration set (statistics, curvature,
corrections, rescoring) gives each rank a contiguous share of the windows (``window_share``;
shares differ by at most one window, and a rank may have none). Each rank divides its losses by
the token count of the WHOLE set, so the sum over ranks of its gradients, covariance sums, loss
and curvature sums is exactly the one-process quantity; ``sum_across_ranks`` adds them up
(all-reduce, in buckets, each bucket's copy overlapped with the previous one's communication).
Every rank ends with the same statistics, up to summation order equal to a one-process run.

Decomposition: ``decompose_sharded`` gives each rank a share of the matrices, balanced by the
estimated cost of their SVDs; each rank decomposes its share, then every matrix's factors are
broadcast from the rank that computed them. The whitening (one Cholesky per input group, cheap
next to the SVDs), scores, selection and packing run identically on every rank and need no
communication. Every rank holds the whole model.

Without an initialised process group, or with a single rank, everything here falls back to
the one-process behaviour (``decompose_sharded`` is then exactly ``decompose_all``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from ..stages.decompose import Factors, decompose_all

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return world()[0] == 0


def comm_device() -> torch.device:
    """Where tensors must live for a collective of the current backend: the current CUDA device
    for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def everywhere(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (a collective: all ranks must call it)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (same number of dimensions everywhere; a collective), on
    the device the caller's tensor is on. Used so that all ranks calibrate on exactly the same
    windows even when they are sampled (``--calib-self``)."""
    if not active():
        return tensor
    device = comm_device()
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=device)
    dist.broadcast(shape, src=0)
    if dist.get_rank() == 0:
        buffer = tensor.detach().to(device).contiguous()
    else:
        buffer = torch.empty(shape.tolist(), dtype=tensor.dtype, device=device)
    dist.broadcast(buffer, src=0)
    return buffer.to(tensor.device)


def window_share(windows: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's windows among ``windows``: contiguous, the first
    ``windows % world_size`` ranks take one more. ``(0, windows)`` in a single process."""
    rank = world()[0]
    shares = windows_per_rank(windows)
    start = sum(shares[:rank])
    return start, start + shares[rank]


def windows_per_rank(windows: int) -> list[int]:
    """How many windows each rank processes (``window_share`` of every rank)."""
    size = world()[1]
    base, extra = divmod(windows, size)
    return [base + (r < extra) for r in range(size)]


BUCKET_BYTES = 64 << 20


def sum_across_ranks(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every tensor by its sum over the ranks, in place (a collective: every rank passes
    tensors of the same shapes and dtypes in the same order).

    Tensors are packed into flat buckets of one dtype on the communication device (the GPU for
    NCCL, the CPU for gloo), so host-resident statistics cross to the GPU a bucket at a time;
    while one bucket is being reduced, the next one is packed.
    """
    if not active():
        return
    device = comm_device()
    pending = None
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in bucket])
        work = dist.all_reduce(flat, async_op=True)
        if pending is not None:
            _unpack(*pending)
        pending = (work, flat, bucket)
    if pending is not None:
        _unpack(*pending)


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int):
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() * t.element_size() > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel() * t.element_size()
        if bucket:
            yield bucket


def _unpack(work, flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    work.wait()
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(part.view_as(t))


def sum_scalar_across_ranks(value: float) -> float:
    """A Python number summed over the ranks (float64)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item())


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); NCCL when ``device`` is CUDA, gloo otherwise. Returns True if
    this call initialised it, False if there is nothing to join or it already exists."""
    if not dist.is_available() or dist.is_initialized() or not all(v in os.environ for v in _TORCHRUN_VARS):
        return False
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def svd_cost(m: int, n: int) -> int:
    """Rough flop count of one whitened SVD of an m x n weight (whitening factor n x n): the product
    W S, the smaller Gram matrix, its eigendecomposition, the partner vectors, and Z = S^{-T} V."""
    r = min(m, n)
    return m * n * n + 2 * m * n * r + 9 * r ** 3 + n * n * r


def shard(names: Sequence[str], costs: Mapping[str, float] | Sequence[float], world_size: int) -> list[list[str]]:
    """Split ``names`` into ``world_size`` shares of nearly equal total cost.

    Longest-processing-time first: the most expensive matrix goes to the least loaded rank
    (ties to the lowest rank; equal costs are taken in name order), so the result depends only
    on the arguments and every rank computes the same assignment. Each share keeps the order of
    ``names``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("names must be unique")
    cost_of = dict(costs) if isinstance(costs, Mapping) else dict(zip(names, costs, strict=True))
    loads = [0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(names, key=lambda s: (-cost_of[s], s)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += cost_of[name]
    return [[name for name in names if owner[name] == rank] for rank in range(world_size)]


def decompose_sharded(weights: dict[str, torch.Tensor], factor_of: dict[str, torch.Tensor], *,
                      method: str = "gram", out_dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None, out_device: torch.device | str | None = None,
                      stats: dict | None = None) -> dict[str, Factors]:
    """``decompose_all`` with the matrices shared out across the ranks of the process group.

    A collective: every rank must call it with the same names, shapes and settings (the values
    only matter on the rank that owns a matrix). Every rank returns all the factors, on the
    device of the corresponding weight (``device``: where to compute, see ``decompose_all``). ``stats``, if given, receives ``rank``, ``world_size``,
    ``shards`` (the names each rank decomposes) and ``computed`` (those this rank decomposed).
    """
    rank, world_size = world()
    names = list(weights)
    if world_size == 1:
        shares = [names]
    else:
        shares = shard(names, {n: svd_cost(*weights[n].shape) for n in names}, world_size)
    mine = {n: weights[n] for n in shares[rank]}
    if stats is not None:
        stats.update(rank=rank, world_size=world_size, shards=shares, computed=list(mine))
    own = decompose_all(mine, {n: factor_of[n] for n in mine}, method=method, out_dtype=out_dtype, device=device,
                        out_device=out_device)
    if world_size == 1:
        return own

    device = comm_device()
    owner = {n: r for r, share in enumerate(shares) for n in share}
    factors: dict[str, Factors] = {}
    for name in names:  # the same order on every rank
        m, n = weights[name].shape
        r = min(m, n)
        shapes = [(m, r), (r,), (n, r)]
        sizes = [m * r, r, n * r]
        if owner[name] == rank:
            f = own[name]
            got = [tuple(f.U.shape), tuple(f.sigma.shape), tuple(f.Z.shape)]
            if got != shapes:
                raise RuntimeError(f"{name}: factors of shapes {got}, expected {shapes}")
            flat = torch.cat([f.U.reshape(-1), f.sigma.reshape(-1), f.Z.reshape(-1)]).to(device)
            dist.broadcast(flat, src=rank)
        else:
            flat = torch.empty(sum(sizes), dtype=out_dtype, device=device)
            dist.broadcast(flat, src=owner[name])
        # The owner, too, takes its factors from the buffer: the same values and the same (contiguous)
        # layout on every rank, so that the later stages compute bit for bit the same on all of them.
        parts = [p.reshape(s).to(out_device or weights[name].device) for p, s in zip(flat.split(sizes), shapes)]
        factors[name] = Factors(*parts)
    return factors
