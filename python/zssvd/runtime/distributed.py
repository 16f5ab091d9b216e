"""Several processes (``torchrun``): the calibration data and the whitened SVDs shared out across ranks.

Data parallel calibration: every gradient pass over the calibration set (statistics, curvature,
corrections, rescoring) gives each rank a contiguous share of the windows (``window_share``;
shares differ by at most one window, and a rank may have none). Each rank divides its losses by
the token count of the WHOLE set, so the sum over ranks of its gradients, covariance sums, loss
and curvature sums is exactly the one-process quantity; ``sum_across_ranks`` adds them up in
buckets, each bucket's copy overlapped with the previous one's communication, up to summation order
equal to a one-process run.

Who holds what (``owners_by_input_group``): every matrix has one owner rank, and the matrices that
share an input (q/k/v, gate/up) share their owner, so each input covariance is needed on one rank.
The calibration pass reduces a matrix's gradient and its group's covariance to that owner only
(``dist.reduce`` per bucket; the other ranks drop their partial sums), so after the pass each rank
holds about 1/world_size of the float64 covariances and float32 gradients. In the block order each block's
statistics are reduced as soon as they are final: its covariances when its forward is done for every window
(``CovarianceCollector.reduce_when_finished``), its gradients when its backward is
(``gradients._GradientsToOwners``, called by ``blockwise.block_order_pass(block_done=...)``), so during the
pass a rank holds its own statistics plus one block's partial sums (``GradientResult.held_bytes``,
``report.json["calibration"]["grad_bytes_during_pass_per_rank"]``). The batch order reduces both when the
pass ends: every micro-batch's backward adds into every target's gradient, so none is final before the last
micro-batch, and each rank holds every partial sum until then. (A rank with no window runs no block, so
when one has none the block order also reduces at the end, unless the model is sharded.) The owner whitens the
group, decomposes its matrices and scores them; the scores and singular values (a few numbers per
component) then go to every rank (``share_from_owners``), which all run the same selection. The
factors and whitening factors go to rank 0 only (``decompose_sharded(owners=...)``, ``share_tensors``),
which packs and saves; the other ranks keep only their own. Stages that run on every rank over the
whole model get what they need from rank 0 when they run: the curvature pass the bases U, the
correction rounds the truncated factors (every rank's forward needs them all). The loss, token counts and
curvature sums (small, needed by every rank's selection) are all-reduced; the curvature pass's weight
gradients, which nothing reads, are not summed at all (in the block order each block's are dropped when
its backward is done). The correction rounds' gradients go to the matrices' owners like the calibration
pass's (``correct(owners=...)``): each owner corrects its own matrices with the S it already holds and sends
the corrected factors to every rank (``share_factors``), whose next forward needs them all. Against the
all-reduce with every rank correcting every matrix (before 2026-12-03's eighth session) the factors, losses
and checkpoint are the same bit for bit at 2 ranks, each correction SVD runs once instead of on every rank, a
rank keeps its own gradients beside the rounds' best point instead of all of them, only the factorised
matrices' gradients are summed, and rank 0 no longer sends every S; what it adds is each round's corrected
factors from their owners. SmolLM2-135M at ratio 0.8, 2 ranks, one round: into collectives 305 MB of
gradients reduced + 220 MB of corrected factors (each owner broadcasting its ~110 MB) instead of 425 MB
all-reduced + 403 MB of S from rank 0; peak resident 3.71 / 3.59 GB -> 3.20 / 2.66 GB (bench/RESULTS.md,
issue 18, eighth session).

Decomposition: ``decompose_sharded`` gives each rank a share of the matrices, balanced by the
estimated cost of their SVDs (whole input groups, with owners); each rank decomposes its share. Every
rank holds the whole model, unless it is sharded (``AnalysisOptions.shard_model``,
``zssvd compress --shard-model``): then ``sharded_for_passes`` shards it with FSDP2 (``shard_blocks``) for
every gradient pass, each rank running as many micro-batches as the others (``padded_share``), each
matrix is gathered whole only to be decomposed (``decompose_sharded``) or corrected, and rank 0 keeps a
resident copy to pack and save (README, "Models larger than one GPU").

Without an initialised process group, or with a single rank, everything here falls back to
the one-process behaviour (``decompose_sharded`` is then exactly ``decompose_all``).

Leaving: ``shutdown`` (the CLI under torchrun, bench/calibration_scale.py) waits on any reduction still in
flight (only an exception can leave one: ``sum_across_ranks`` waits on its own before returning), meets the
other ranks at a barrier when this rank finished without an error, then destroys the group: a gloo rank that
tears its connections down while a peer still talks to it can abort the peer.

Failures: a rank that dies (killed, out of memory, an error) closes its connections, and the
collective the others are in fails at once with the backend's error; a rank that stops answering
without dying (a hung node) fails them after the process group's timeout (``init_from_env``,
``zssvd compress --dist-timeout``). Either way every collective here raises ``CollectiveFailed``,
one line naming the ranks that died on this node (their pids are exchanged when the group starts)
and how to resume: the stages finished before the failure are in the stage cache, and the same
command run again reuses them. torchrun's agent stops the remaining ranks with SIGTERM when one
exits; under torchrun that SIGTERM raises ``Terminated`` with the same information.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..stages.decompose import Factors, decompose_all

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# How long a collective waits for the other ranks. Legitimate waits are long: rank 0 writes the
# stage cache entries (tens of GB for a 7B model) while the others wait in the next collective.
DEFAULT_TIMEOUT_S = 1800.0
RESUME = "rerun the same command: the stages already in the cache (--cache-dir) are reused"


class CollectiveFailed(RuntimeError):
    """A collective failed because another rank died or stopped answering (a one-line message)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM under torchrun: its agent stops every rank when one of them fails (or the job is cancelled)."""


_peers: list[tuple[str, int]] = []  # (host name, pid) of every rank, exchanged when the group starts
_timeout_s = DEFAULT_TIMEOUT_S
_failing = False  # a failure is being reported: a later SIGTERM must not interrupt the report
SUMMING = "summing the statistics across ranks"


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
    with collective("agreeing on the cache entries"):
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
    with collective("sharing rank 0's calibration windows"):
        dist.broadcast(shape, src=0)
    if dist.get_rank() == 0:
        buffer = tensor.detach().to(device).contiguous()
    else:
        buffer = torch.empty(shape.tolist(), dtype=tensor.dtype, device=device)
    with collective("sharing rank 0's calibration windows"):
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
# Work handles of ``sum_across_ranks``'s async reductions not yet waited on. It waits on each before it
# returns, so this is empty unless an exception left it in the middle (``shutdown`` waits on them).
_outstanding: list = []


def sum_across_ranks(tensors: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES,
                     owners: Sequence[int] | None = None) -> None:
    """Replace tensors by their sum over the ranks, in place (a collective: every rank passes
    tensors of the same shapes and dtypes in the same order).

    ``owners`` (one rank per tensor): only that rank needs the sum, so it alone receives it
    (``dist.reduce``); on the other ranks the tensor is left as it was, a partial sum for the caller
    to drop. Without ``owners`` every rank receives every sum (all-reduce).

    Tensors are packed into flat buckets of one dtype and one owner on the communication device (the
    GPU for NCCL, the CPU for gloo), so host-resident statistics cross to the GPU a bucket at a time;
    while one bucket is being reduced, the next one is packed.
    """
    if not active():
        return
    device, rank = comm_device(), dist.get_rank()
    pending = None
    for owner, bucket in _buckets(tensors, bucket_bytes, owners):
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in bucket])
        with collective(SUMMING):
            if owner is None:
                work = dist.all_reduce(flat, async_op=True)
            else:
                work = dist.reduce(flat, dst=owner, async_op=True)
        _outstanding.append(work)
        if pending is not None:
            _unpack(*pending)
        pending = (work, flat, bucket if owner in (None, rank) else [])
    if pending is not None:
        _unpack(*pending)


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int, owners: Sequence[int] | None):
    """``(owner, tensors)`` buckets of one dtype and one owner (None: every rank), at most ``bucket_bytes``
    unless one tensor is larger."""
    if owners is None:
        owners = [None] * len(tensors)
    elif len(owners) != len(tensors):
        raise ValueError(f"{len(owners)} owners for {len(tensors)} tensors: pass one owner rank per tensor")
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t, owner in zip(tensors, owners):
        groups.setdefault((owner, t.dtype), []).append(t)
    for (owner, _), group in groups.items():
        bucket, size = [], 0
        for t in group:
            if bucket and size + t.numel() * t.element_size() > bucket_bytes:
                yield owner, bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel() * t.element_size()
        if bucket:
            yield owner, bucket


def _unpack(work, flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    with collective(SUMMING):
        work.wait()
    _outstanding.remove(work)
    if not bucket:  # reduced to another rank: nothing comes back here
        return
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(part.view_as(t))


def sum_scalar_across_ranks(value: float) -> float:
    """A Python number summed over the ranks (float64)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    with collective(SUMMING):
        dist.all_reduce(t)
    return float(t.item())


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); NCCL when ``device`` is CUDA, gloo otherwise. Returns True if
    this call initialised it, False if there is nothing to join or it already exists.

    ``timeout_s`` (default ``DEFAULT_TIMEOUT_S``): how long a collective waits for a rank that
    neither answers nor dies. The ranks then exchange their host names and pids (so that a failure
    can name the rank that died), and SIGTERM raises ``Terminated`` in this process (torchrun's agent
    sends it to the other ranks when one fails)."""
    global _timeout_s
    if not dist.is_available() or dist.is_initialized() or not all(v in os.environ for v in _TORCHRUN_VARS):
        return False
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    _timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=_timeout_s))
    record_peers()
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _on_sigterm)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


SHUTDOWN_WAIT_S = 10.0


def shutdown(clean: bool = True, wait_s: float = SHUTDOWN_WAIT_S) -> None:
    """Leave the process group: wait on every reduction still in flight, meet the other ranks at a barrier,
    then destroy the group. Does nothing without an initialised group.

    Destroying a gloo group while a peer still sends on one of its connections can abort the process (seen
    once in 18 runs of bench/calibration_scale.py). ``sum_across_ranks`` waits on its async reductions before
    it returns, so works are outstanding only when an exception (an interrupt, a failed collective) left it
    in the middle; those are waited on for at most ``wait_s`` seconds each, errors ignored. ``clean`` (the
    command finished on this rank without an error): meet the others at a barrier first, so that no rank tears
    its connections down while another still talks to it. After a failure there is no barrier: the ranks
    are not at the same point, and a dead one would hold it until the timeout. A barrier that fails (another
    rank failed) is logged, not raised: this rank's work is done."""
    if not (dist.is_available() and dist.is_initialized()):
        _outstanding.clear()
        return
    try:
        for work in list(_outstanding):
            try:
                work.wait(timeout=timedelta(seconds=wait_s))
            except Exception as err:  # noqa: BLE001 - leaving anyway; the failure was reported where it happened
                log.debug("an outstanding reduction ended with %s", err)
        _outstanding.clear()
        if clean and not _failing and dist.get_world_size() > 1:
            try:
                with collective("meeting the other ranks before leaving"):
                    dist.barrier()
            except CollectiveFailed as err:
                log.warning("%s", err)
    finally:
        dist.destroy_process_group()


def record_peers() -> None:
    """Exchange every rank's (host name, pid), for naming a dead rank later (a collective)."""
    peers: list = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _peers[:] = [tuple(p) for p in peers]


@contextmanager
def collective(what: str):
    """Turn a failed collective into ``CollectiveFailed``: one line naming what was being done, the
    ranks found dead, the backend's own words, and how to resume."""
    global _failing
    try:
        yield
    except CollectiveFailed:
        raise
    except RuntimeError as err:  # gloo's and NCCL's errors, DistBackendError included
        _failing = True
        raise CollectiveFailed(f"{_whoami()}: {what} failed: {_cause()} ({_backend_words(err)}); {RESUME}") from err


def _whoami() -> str:
    rank, size = world()
    return f"rank {rank} of {size}"


def _backend_words(err: BaseException) -> str:
    """The first sentence of a backend error, without its source location (gloo: "[.../pair.cc:537] ...")."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0].rstrip(".")


def _cause(wait_s: float = 1.0) -> str:
    """Which ranks died, as far as this node can see: a rank's socket closes while its process exits,
    so the process may take a moment to be gone; wait up to ``wait_s`` for it."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = dead_ranks()
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if dead:
        return f"{_named(dead)} on this node died"
    here = socket.gethostname()
    elsewhere = any(host != here for host, _ in _peers)
    who = "no rank on this node died: a rank on another node died, or one" if elsewhere else "no rank died: one"
    return f"{who} stopped answering for the timeout ({_timeout_s:g} s, --dist-timeout)"


def _named(ranks: Sequence[int]) -> str:
    return ", ".join(f"rank {r} (pid {_peers[r][1]})" for r in ranks)


def dead_ranks(peers: Sequence[tuple[str, int]] | None = None) -> list[int]:
    """The ranks on this host whose process no longer runs (gone, or a zombie not yet reaped)."""
    here = socket.gethostname()
    return [rank for rank, (host, pid) in enumerate(_peers if peers is None else peers)
            if host == here and pid != os.getpid() and _process_gone(pid)]


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc (not Linux): a live process is all that can be said
    return state in ("Z", "X")


def _on_sigterm(signum, frame):
    global _failing
    if _failing:
        return  # already reporting a failure: finish the report and exit
    _failing = True
    raise Terminated(f"{_whoami()} stopped by SIGTERM ({_stop_reason()}); {RESUME}")


def _stop_reason() -> str:
    dead = dead_ranks()
    if dead:
        return f"{_named(dead)} on this node died and torchrun stops every rank"
    return "torchrun stops every rank when one fails (its report names it), or the job was cancelled"


def shard_blocks(model: torch.nn.Module, blocks_path: str | None = None) -> None:
    """Shard ``model``'s weights across the ranks with FSDP2 (``fully_shard``): each decoder block is
    one unit, gathered whole just before it runs and freed after, and the rest (embeddings, head) is
    the root unit; every rank keeps 1/world_size of every weight. Weights are frozen (the calibration
    hooks take gradients without parameters requiring them). A collective.

    The gradient passes (batch or block order, covariances, gradients, curvature, corrections) run on
    the sharded model, each rank on its share of the windows padded to equal micro-batch counts
    (``padded_share``), and give the resident model's statistics (tests/zssvd/runtime/
    test_sharded_calibration.py). How the other stages get whole weights: ``sharded_for_passes``, and
    the README's "Models larger than one GPU".
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..io.models import find_blocks

    for p in model.parameters():
        p.requires_grad_(False)
    # FSDP2 warns when a block returns a view (OPT's blocks do): an in-place op on it would skip the backward's
    # gather. Nothing here changes a block's output in place (the sharded passes equal the resident ones, tested).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(comm_device().type, (world()[1],))
    _, blocks = find_blocks(model, blocks_path)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are FSDP2 shards (DTensors, see ``shard_blocks``)."""
    return any(is_sharded_tensor(p) for p in model.parameters())


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sharded_for_passes(model: torch.nn.Module, blocks_path: str | None = None) -> torch.nn.Module:
    """The FSDP2-sharded model the gradient passes run on (a collective).

    Rank 0 shards a copy and keeps ``model`` whole, in the memory it was loaded in (host memory under
    ``zssvd compress --shard-model``), because it packs and saves the compressed model: FSDP2 cannot be
    undone in place. The other ranks shard ``model`` itself: from then on they hold their shards, and
    one block at a time whole while it runs.
    """
    passes = copy.deepcopy(model) if is_main() else model
    shard_blocks(passes, blocks_path)
    return passes


def whole(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a weight: a sharded one (DTensor) is gathered, a collective that every rank
    must call for the same weights in the same order; a plain one is returned as it is."""
    if not is_sharded_tensor(weight):
        return weight
    with collective("gathering a sharded weight"):
        return weight.full_tensor()


@torch.no_grad()
def overwrite_shard(weight: torch.Tensor, value: torch.Tensor):
    """Write the whole ``value`` into a sharded ``weight`` in place, each rank its own part (no
    communication: every rank holds ``value``); returns a function that puts the old values back.

    In place, because FSDP2 gathers a block's weights from the storage it sharded them into."""
    from torch.distributed.tensor import distribute_tensor

    local = weight.to_local()
    mine = distribute_tensor(value.to(dtype=local.dtype, device=local.device), weight.device_mesh,
                             weight.placements, src_data_rank=None).to_local()  # src_data_rank=None: no scatter
    saved = local.clone()
    local.copy_(mine)
    return lambda: local.copy_(saved)


def padded_share(input_ids: torch.Tensor, pad: bool) -> tuple[torch.Tensor, int]:
    """This rank's windows of ``input_ids`` and how many of them count.

    ``pad=True`` (a sharded model) appends copies of the set's first window up to the largest share, so
    that every rank runs the same micro-batches in the same shapes: FSDP2 gathers a block's weights in
    each forward and backward, and a rank that stopped early would leave the others waiting in that
    gather. The copies' loss, gradients and covariances are left out (``counted_windows``).
    """
    start, stop = window_share(input_ids.shape[0])
    mine = input_ids[start:stop]
    missing = max(windows_per_rank(input_ids.shape[0])) - mine.shape[0] if pad else 0
    if missing:
        mine = torch.cat([mine, input_ids[:1].expand(missing, -1)])
    return mine, stop - start


def counted_windows(first: int, size: int, counted: int) -> int:
    """How many of the ``size`` windows of a micro-batch starting at window ``first`` count (the first
    ``counted`` windows of a rank count; the rest is ``padded_share``'s padding)."""
    return max(0, min(size, counted - first))


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


def owners_by_input_group(groups: Mapping[str, Sequence[tuple[str, tuple[int, int]]]],
                          world_size: int) -> dict[str, int]:
    """The owner rank of every matrix: ``groups`` maps each input group to its matrices' ``(name, shape)``.

    Whole groups are shared out (``shard``, balanced by the summed cost of their SVDs), so the matrices
    that read one input covariance (q/k/v, gate/up) have one owner, which alone needs that covariance
    and its whitening factor. Every rank computes the same assignment from the same arguments.
    """
    costs = {g: sum(svd_cost(*shape) for _, shape in members) for g, members in groups.items()}
    shares = shard(list(groups), costs, world_size)
    return {name: rank for rank, share in enumerate(shares) for g in share for name, _ in groups[g]}


def share_from_owners(owned: Mapping[str, torch.Tensor], numels: Mapping[str, int], owners: Mapping[str, int],
                      dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every matrix's 1-D tensor (scores, singular values: a few numbers per component) on every rank,
    from its owner, which passes it in ``owned``. One broadcast per rank, of all that rank's tensors
    packed flat in the order of ``numels`` (the same on every rank). A collective."""
    if not active():
        return {name: owned[name] for name in numels}
    rank, comm = dist.get_rank(), comm_device()
    out = {}
    for src in range(dist.get_world_size()):
        names = [n for n in numels if owners[n] == src]
        if not names:
            continue
        if src == rank:
            flat = torch.cat([owned[n].reshape(-1).to(device=comm, dtype=dtype) for n in names])
        else:
            flat = torch.empty(sum(numels[n] for n in names), dtype=dtype, device=comm)
        with collective("sharing the scores"):
            dist.broadcast(flat, src=src)
        out.update(zip(names, (part.to(device) for part in flat.split([numels[n] for n in names]))))
    return {name: out[name] for name in numels}


def share_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], sources: Mapping[str, int], *,
                  to_all: bool, dtype: torch.dtype = torch.float32,
                  what: str = "sharing the whitened SVDs") -> dict[str, torch.Tensor]:
    """Send each named tensor from its source rank (which passes it in ``tensors``) to every rank
    (``to_all``) or to rank 0 only; returns the tensors this rank holds afterwards, in the order of
    ``shapes`` (the same on every rank), on the communication device. A collective.

    The source, too, takes its tensor back through the flat buffer: the same values in the same
    (contiguous) layout on every rank that holds it, so later stages compute bit for bit alike.
    """
    rank, comm = world()[0], comm_device() if active() else torch.device("cpu")
    out = {}
    for name, shape in shapes.items():
        src = sources[name]
        if rank == src:
            flat = tensors[name].detach().reshape(-1).to(device=comm, dtype=dtype)
        elif to_all or rank == 0:
            flat = torch.empty(math.prod(shape), dtype=dtype, device=comm)
        else:
            continue  # neither the source nor a receiver: nothing to do for this tensor
        if active() and (to_all or src != 0):
            with collective(what):
                if to_all:
                    dist.broadcast(flat, src=src)
                elif rank == src:
                    dist.send(flat, dst=0)
                else:
                    dist.recv(flat, src=src)
        out[name] = flat.reshape(shape)
    return out


def factor_shapes(weight_shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int] | None = None) -> dict:
    """``(m, r, n)`` of every matrix's factors: U m x r, sigma r, Z n x r (``ranks``: kept components;
    default the full rank min(m, n))."""
    return {name: (m, min(m, n) if ranks is None else ranks[name], n) for name, (m, n) in weight_shapes.items()}


def share_factors(factors: Mapping[str, Factors], shapes: Mapping[str, tuple[int, int, int]],
                  sources: Mapping[str, int], *, to_all: bool,
                  dtype: torch.dtype = torch.float32) -> dict[str, Factors]:
    """``share_tensors`` for factors (``shapes`` from ``factor_shapes``): each matrix's U, sigma and Z
    travel as one flat tensor, made when that matrix's turn comes (not a second copy of them all at once)."""
    flats = _FlatFactors(factors)
    sizes = {name: (m * r + r + n * r,) for name, (m, r, n) in shapes.items()}
    got = share_tensors(flats, sizes, sources, to_all=to_all, dtype=dtype)
    out = {}
    for name, flat in got.items():
        m, r, n = shapes[name]
        U, sigma, Z = flat.split([m * r, r, n * r])
        out[name] = Factors(U.reshape(m, r), sigma, Z.reshape(n, r))
    return out


class _FlatFactors(Mapping):
    """Each matrix's factors as one flat tensor, concatenated when it is asked for."""

    def __init__(self, factors: Mapping[str, Factors]):
        self.factors = factors

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.factors[name]
        return torch.cat([f.U.reshape(-1), f.sigma.reshape(-1), f.Z.reshape(-1)])

    def __iter__(self):
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)


def decompose_sharded(weights: dict[str, torch.Tensor], factor_of: dict[str, torch.Tensor], *,
                      method: str = "gram", out_dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None, out_device: torch.device | str | None = None,
                      stats: dict | None = None, owners: Mapping[str, int] | None = None) -> dict[str, Factors]:
    """``decompose_all`` with the matrices shared out across the ranks of the process group.

    A collective: every rank must call it with the same names, shapes and settings (the values, and
    ``factor_of``, only matter on the rank that owns a matrix). Without ``owners`` the matrices are
    shared out one by one (``shard``) and every rank returns all the factors. With ``owners`` (matrix ->
    rank, ``owners_by_input_group``) each rank decomposes its own, and the factors go to rank 0 only,
    which packs: rank 0 returns all of them, the others their own. Factors are returned on
    ``out_device``, by default the device of the corresponding weight (``device``: where to compute, see
    ``decompose_all``). ``stats``, if given, receives ``rank``, ``world_size``, ``shards`` (the names each
    rank decomposes) and ``computed`` (those this rank decomposed). Sharded weights (DTensors) are
    gathered one matrix at a time and kept by their owner only.
    """
    rank, world_size = world()
    names = list(weights)
    if world_size == 1:
        shares = [names]
    elif owners is None:
        shares = shard(names, {n: svd_cost(*weights[n].shape) for n in names}, world_size)
    else:
        shares = [[n for n in names if owners[n] == r] for r in range(world_size)]
    mine = _owned_whole(weights, shares[rank])
    if stats is not None:
        stats.update(rank=rank, world_size=world_size, shards=shares, computed=list(mine))
    own = decompose_all(mine, {n: factor_of[n] for n in mine}, method=method, out_dtype=out_dtype, device=device,
                        out_device=out_device)
    if world_size == 1:
        return own
    shapes = factor_shapes({n: tuple(weights[n].shape) for n in names})
    for name, f in own.items():
        got = (tuple(f.U.shape), tuple(f.sigma.shape), tuple(f.Z.shape))
        m, r, n = shapes[name]
        if got != ((m, r), (r,), (n, r)):
            raise RuntimeError(f"{name}: factors of shapes {got}, expected {((m, r), (r,), (n, r))}")
    source = {n: r for r, share in enumerate(shares) for n in share}
    factors = share_factors(own, shapes, source, to_all=owners is None, dtype=out_dtype)
    return {name: f.to(device=out_device or weights[name].device) for name, f in factors.items()}


def _owned_whole(weights: dict[str, torch.Tensor], owned: Sequence[str]) -> dict[str, torch.Tensor]:
    """The whole weights of the matrices this rank decomposes. Sharded ones are gathered one at a time,
    every rank taking part in every gather (in the order of ``weights``) and only the owner keeping it."""
    owned = set(owned)
    mine = {}
    for name, weight in weights.items():
        full = whole(weight)
        if name in owned:
            mine[name] = full
    return mine
