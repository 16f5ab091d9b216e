"""Stage 5 (select) -- global selection of the singular components to remove, under a storage budget.

Every component of every target is one candidate with a signed predicted loss change dL_i.
Components leave the model one at a time until the stored size meets the budget:

* ``zero-sum`` (the paper's rule): two min-heaps keyed by |dL|, one for dL >= 0 and one for
  dL < 0. While the running sum s of removed dL is <= 0 take from the dL >= 0 heap, else from
  the dL < 0 heap (the other one when the preferred heap is empty), so s stays near zero;
* ``zero-sum-2nd`` (ours): the same rule on scores that include a second-order term
  0.5 sigma_i^2 u_i^T A u_i (see ``curvature``); better than zero-sum on SmolLM2 at every ratio
  measured (bench/RESULTS.md);
* ``uniform`` (SVD-LLM): every matrix keeps the same fraction of its storage;
* ablations of the paper's Table 6: ``most-negative`` (smallest dL first), ``abs-dl``
  (smallest |dL| first), ``sigma`` (smallest whitened singular value first).

With ``ordered=True`` (the default and the paper's rule) a matrix gives up its components
strictly from the smallest singular value upward: only each matrix's current tail is a
candidate. ``ordered=False`` lets any component of any matrix go at any time. With a
``rank_multiple`` g > 1 (ordered only) a matrix of rank >= 8g gives up its tail in blocks that
leave its rank a multiple of g, each block one candidate scored by its summed dL (aligned ranks for
kernels; it costs some quality, so the default is g = 1: bench/RESULTS.md, "Rank multiples").

Storage accounting, in 16-bit-parameter units, for a matrix m x n keeping k components:

* ``dense``: min(mn, k(m+n)) -- a factor pair pays off only below r* = mn/(m+n); above it
  the original matrix is kept dense;
* ``remap``: k max(m, n) -- both factors' overlapping part in 8 bits, two to a 16-bit slot;
* ``hq``: half of dense's cost -- every stored parameter in 8 bits (fp8);
* ``int4``: every stored matrix in 4 bits, asymmetric round-to-nearest in groups of g values
  along the dimension its product reduces over, with a float16 scale and a float16 zero point
  (the group's minimum) per group (``zskernels.formats.int4``). A rows x K matrix costs its exact
  bytes / 2: rows (Kp/2 + 4 Kp/g) + 8 bytes, Kp = K rounded up to a multiple of g (the padding is
  stored), i.e. rows K b/16 16-bit units with b = 4 + 32/g bits per weight (4.5 for g = 64) when
  g divides K. A factor pair stores V^T (k x n, groups along n) and U (m x k, groups along k), so a
  rank below g still pays a whole group per row of U; a matrix kept dense is the int4
  round-to-nearest of the original weight. Plain int4 round-to-nearest (nothing factorised) costs
  b/16 (0.28125 for g = 64, for dimensions that g divides) plus the 8-byte headers, so the ratios
  accepted go up to b/16 + 1e-4 (``--ratio 0.2813`` gives round-to-nearest on SmolLM2); below it
  components leave by the chosen rule, and a matrix is stored as factors once they cost less than
  its dense int4 form (the headers make ratio b/16 itself factorise a matrix or two).

With ``group_size="auto"`` (``AUTO_GROUP_SIZE``) the ranks are chosen here with g = 64, then
``zssvd.stages.precision`` picks every factor's and dense matrix's group size by measurement within
the same budget (``Selection.group_sizes``).

The budget is ``ratio x`` the targets' dense parameters; the result is the first point where
the stored size is at or below it, so the achieved ratio never exceeds the target and falls
short of it by at most one component's cost.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

STRATEGIES = ("zero-sum", "zero-sum-2nd", "uniform", "most-negative", "abs-dl", "sigma")
STORAGES = ("dense", "remap", "hq", "int4")
DEFAULT_GROUP_SIZE = 64  # int4: values per scale / zero point (a CompressionConfig field)
AUTO_GROUP_SIZE = "auto"  # int4: a group size per factor and matrix, chosen by measurement (stages.precision)
# Above b/16, int4 accepts ratios this much larger: plain round-to-nearest costs b/16 plus each matrix's
# 8-byte header (the true K), 8e-6 of SmolLM2's targets, so ``--ratio 0.2813`` (g = 64) gives it exactly.
INT4_HEADER_SLACK = 1e-4


class RatioError(ValueError):
    """A target ratio the chosen storage cannot meet."""


@dataclass(frozen=True)
class MatrixSpec:
    name: str
    out_features: int  # m
    in_features: int  # n

    @property
    def rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def base_group_size(group_size: int | str) -> int:
    """The group size ranks are budgeted with: ``group_size`` itself, or 64 for "auto" (whose measured
    precisions then spend the same budget differently, ``zssvd.stages.precision``)."""
    if isinstance(group_size, str):
        if group_size != AUTO_GROUP_SIZE:
            raise ValueError(f"group_size must be a positive multiple of 16 (e.g. 64) or {AUTO_GROUP_SIZE!r}, "
                             f"got {group_size!r}")
        return DEFAULT_GROUP_SIZE
    return group_size


def int4_bits(group_size: int) -> float:
    """Bits per int4 weight with group size g, its scale and zero point included (4 + 32/g); a
    ValueError naming the rule for a group size the format does not take."""
    from zskernels.formats.int4 import int4_bits_per_weight  # on first use: zssvd imports no zskernels

    return float(int4_bits_per_weight(group_size))


def int4_matrix_cost(rows: int, K: int, group_size: int) -> float:
    """16-bit parameters of a rows x K matrix in int4 with groups of ``group_size`` along K: its exact bytes / 2."""
    from zskernels.formats.int4 import int4_nbytes_for_shape

    return int4_nbytes_for_shape(rows, K, group_size) / 2


def _int4_lowrank_cost(m: int, n: int, k: int, groups: dict[str, int]) -> float:
    """V^T (k x n) grouped along n, U (m x k) grouped along k: the layout of ``pack_int4_lowrank``."""
    return int4_matrix_cost(k, n, groups["v"]) + int4_matrix_cost(m, k, groups["u"])


def int4_cost(m: int, n: int, k: int, groups: dict[str, int]) -> float:
    """int4 cost with a group size per part ({"weight": g, "v": g, "u": g}): the cheaper of the dense
    matrix and the factor pair."""
    return min(int4_matrix_cost(m, n, groups["weight"]), _int4_lowrank_cost(m, n, k, groups))


def int4_stays_dense(m: int, n: int, k: int, groups: dict[str, int]) -> bool:
    return _int4_lowrank_cost(m, n, k, groups) >= int4_matrix_cost(m, n, groups["weight"])


def _same_groups(group_size: int) -> dict[str, int]:
    return {"weight": group_size, "v": group_size, "u": group_size}


def storage_cost(storage: str, m: int, n: int, k: int, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Stored size, in 16-bit parameters, of an m x n matrix that keeps k components.

    ``group_size`` matters for ``int4`` only.
    """
    if storage == "int4":
        return int4_cost(m, n, k, _same_groups(group_size))
    if storage == "dense":
        return float(min(m * n, k * (m + n)))
    if storage == "remap":
        return float(min(m * n, k * max(m, n)))
    if storage == "hq":
        return 0.5 * min(m * n, k * (m + n))
    raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")


def stays_dense(storage: str, m: int, n: int, k: int, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether a matrix keeping k components is cheaper (or no dearer) stored as a full matrix."""
    if storage == "int4":
        return int4_stays_dense(m, n, k, _same_groups(group_size))
    if storage == "remap":
        return k >= min(m, n)
    return k * (m + n) >= m * n


@dataclass
class Selection:
    """The outcome: which components each matrix keeps and how it is stored."""

    storage: str
    strategy: str
    ordered: bool
    target_ratio: float
    keep: dict[str, torch.Tensor]  # name -> sorted indices of kept components
    dense: dict[str, bool]  # name -> stored as a full matrix (original weights)
    achieved_ratio: float
    running_sum: list[float] = field(default_factory=list)  # s after each removal (zero-sum and others)
    removed: list[tuple[str, int]] = field(default_factory=list)  # in removal order
    group_size: int = DEFAULT_GROUP_SIZE  # int4: values per scale and zero point
    # int4 with measured precisions: name -> {"weight": g} (kept dense) or {"v": g, "u": g} (V^T and U of
    # a pair); empty: every matrix uses ``group_size``. ``precision_errors`` holds the measurements behind them.
    group_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    precision_errors: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(idx.numel()) for name, idx in self.keep.items()}

    def int4_group_sizes(self, name: str) -> dict[str, int]:
        """int4 group size of each stored part of ``name``: {"weight": g} or {"v": g, "u": g}."""
        if name in self.group_sizes:
            return dict(self.group_sizes[name])
        return {"weight": self.group_size} if self.dense[name] else {"v": self.group_size, "u": self.group_size}


def check_ratio_range(ratio: float, storage: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """The checks that need no model: 0 < ratio < 1, a known storage, hq at most 0.5, int4 at most b/16
    (b of the base group size: 64 for "auto")."""
    if storage == "int4":
        group_size = base_group_size(group_size)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not 0.0 < ratio < 1.0:
        raise RatioError(f"ratio must lie strictly between 0 and 1 (the fraction of the targets' storage "
                         f"to keep), got {ratio}")
    if storage == "hq" and ratio > 0.5:
        raise RatioError(f"hq storage keeps every parameter in 8 bits, so even uncompressed ranks reach ratio "
                         f"0.5; for ratio {ratio} use --storage remap or --storage dense")
    if storage == "int4":
        ceiling = int4_bits(group_size) / 16
        if ratio > ceiling + INT4_HEADER_SLACK:
            raise RatioError(f"int4 storage with group size {group_size} keeps every weight in "
                             f"{int4_bits(group_size):g} bits (scales and zero points included), so it reaches at "
                             f"most ratio {ceiling:.5f} (plain round-to-nearest, plus an 8-byte header per matrix); "
                             f"for ratio {ratio} use --storage hq (<= 0.5), remap or dense, or a smaller --group-size")


def check_ratio(specs: list[MatrixSpec], ratio: float, storage: str, min_rank: int = 1,
                group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raise a RatioError naming the reachable range when ``ratio`` cannot be met."""
    check_ratio_range(ratio, storage, group_size)
    group_size = base_group_size(group_size)
    total = sum(s.params for s in specs)
    floor = sum(storage_cost(storage, s.out_features, s.in_features, min(min_rank, s.rank), group_size)
                for s in specs) / total
    if ratio < floor:
        raise RatioError(f"ratio {ratio} is below the smallest reachable with {storage} storage "
                         f"({floor:.4f}, every matrix at rank {min_rank}); choose a larger ratio")


def select(specs: list[MatrixSpec], scores: dict[str, torch.Tensor], sigmas: dict[str, torch.Tensor], *,
           ratio: float, storage: str = "dense", strategy: str = "zero-sum", ordered: bool = True,
           min_rank: int = 1, curvature: dict[str, torch.Tensor] | None = None,
           group_size: int | str = DEFAULT_GROUP_SIZE, rank_multiple: int = 1,
           group_sizes: dict[str, dict[str, int]] | None = None) -> Selection:
    """Choose kept components for every matrix so that the stored size meets ``ratio``.

    ``curvature`` (second-order terms, per component) is required by ``zero-sum-2nd``;
    ``group_size`` is int4's (values per scale and zero point; "auto" budgets with 64, and
    ``stages.precision`` chooses the precisions afterwards); ``group_sizes`` (int4): name -> {"weight": g,
    "v": g, "u": g} overriding ``group_size`` in that matrix's costs; ``rank_multiple``: factorised
    matrices (of rank >= 8x it, with ``ordered``) keep a multiple of it (``rank_step``).
    """
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive integer, got {rank_multiple!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_ratio(specs, ratio, storage, min_rank, group_size)
    group_size = base_group_size(group_size)
    cost = _Cost(storage, group_size, group_sizes or {})
    if strategy == "zero-sum-2nd":
        if curvature is None:
            raise ValueError("strategy zero-sum-2nd needs the second-order terms (zssvd.stages.curvature)")
        scores = {name: scores[name].double() + curvature[name].double() for name in scores}
    if strategy == "uniform":
        kept = {s.name: _round_down(_uniform_rank(s, ratio, cost), s, rank_multiple) for s in specs}
        return _finish(specs, kept, None, cost, strategy, ordered, ratio, [], [])
    return _greedy(specs, scores, sigmas, ratio, cost, strategy, ordered, min_rank, rank_multiple)


def _round_down(k: int, spec: MatrixSpec, rank_multiple: int) -> int:
    """A factorised rank rounded down to the matrix's step (a full rank stays: the matrix stays dense)."""
    return k if k >= spec.rank else k - k % rank_step(spec, rank_multiple)


@dataclass(frozen=True)
class _Cost:
    """One storage's accounting (with int4's group size, or a matrix's own group sizes):
    ``cost(spec, k)``, ``dense(spec, k)``."""

    storage: str
    group_size: int
    group_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    def __call__(self, spec: MatrixSpec, k: int) -> float:
        groups = self.group_sizes.get(spec.name)
        if groups is None:
            return storage_cost(self.storage, spec.out_features, spec.in_features, k, self.group_size)
        return int4_cost(spec.out_features, spec.in_features, k, groups)

    def dense(self, spec: MatrixSpec, k: int) -> bool:
        groups = self.group_sizes.get(spec.name)
        if groups is None:
            return stays_dense(self.storage, spec.out_features, spec.in_features, k, self.group_size)
        return int4_stays_dense(spec.out_features, spec.in_features, k, groups)

    def parts(self, spec: MatrixSpec, k: int) -> dict[str, int]:
        """The overriding group sizes of the stored parts ({"weight": g} or {"v": g, "u": g}), or {}."""
        groups = self.group_sizes.get(spec.name)
        if groups is None:
            return {}
        return {"weight": groups["weight"]} if self.dense(spec, k) else {"v": groups["v"], "u": groups["u"]}


def _uniform_rank(spec: MatrixSpec, ratio: float, cost: _Cost) -> int:
    """The largest k whose storage is at most ``ratio`` of the matrix's (SVD-LLM's rule for dense)."""
    m, n = spec.out_features, spec.in_features
    limit = ratio * m * n
    storage = cost.storage
    if storage == "int4":  # the cost grows with k: the largest k within the limit, by bisection
        low, high = 0, spec.rank
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(spec, mid) <= limit else (low, mid - 1)
        return low
    if storage == "dense":
        k = int(limit // (m + n))
    elif storage == "remap":
        k = int(limit // max(m, n))
    else:  # hq: half price per parameter; a matrix may even stay dense in 8 bits
        k = spec.rank if 0.5 * m * n <= limit else int(2 * limit // (m + n))
    return max(0, min(k, spec.rank))


def rank_step(spec: MatrixSpec, rank_multiple: int) -> int:
    """Components one removal takes from this matrix: ``rank_multiple``, for matrices with at least 8
    such blocks (the kernels' tiles and int8pack's K want ranks in multiples of 16); 1 otherwise."""
    return rank_multiple if spec.rank >= 8 * rank_multiple else 1


def _greedy(specs, scores, sigmas, ratio, cost_of: _Cost, strategy, ordered, min_rank,
            rank_multiple: int = 1) -> Selection:
    total = sum(s.params for s in specs)
    budget = ratio * total
    dl = [scores[s.name].double().tolist() for s in specs]
    sg = [sigmas[s.name].double().tolist() for s in specs]
    for s, values in zip(specs, dl):
        if len(values) != s.rank:
            raise ValueError(f"{s.name}: {len(values)} scores for a rank-{s.rank} matrix")
    kept = [s.rank for s in specs]
    # Ordered removal takes each matrix's tail in blocks that leave its rank a multiple of its step.
    steps = [rank_step(s, rank_multiple) if ordered else 1 for s in specs]

    def block(i: int) -> range:  # the components matrix i gives up next (ordered: its tail)
        return range(((kept[i] - 1) // steps[i]) * steps[i], kept[i])

    def push_tail(i: int) -> None:
        tail = block(i)
        pools.push(i, tail.stop - 1, sum(dl[i][j] for j in tail), sg[i][tail.start])

    cost = sum(cost_of(s, s.rank) for s in specs)
    pools = _Pools(strategy)
    for i, s in enumerate(specs):
        if ordered:
            push_tail(i)
        else:
            for j in range(s.rank):
                pools.push(i, j, dl[i][j], sg[i][j])
    running, trace, removed = 0.0, [], []
    # The rule stops at the first point at or below the budget (tiny slack for float sums).
    while cost > budget * (1 + 1e-12):
        entry = pools.pop(running)
        if entry is None:
            raise RatioError(f"ran out of components before reaching ratio {ratio} (min rank {min_rank})")
        i, j = entry
        s = specs[i]
        gone = block(i) if ordered else range(j, j + 1)
        if kept[i] - len(gone) < min_rank:
            continue  # this matrix is exhausted; discard its candidate
        cost += cost_of(s, kept[i] - len(gone)) - cost_of(s, kept[i])
        kept[i] -= len(gone)
        running += sum(dl[i][g] for g in gone)
        trace.append(running)
        removed.extend((s.name, g) for g in reversed(gone))
        if ordered and kept[i] > min_rank:
            push_tail(i)
    gone: dict[str, set[int]] = {}
    for name, j in removed:
        gone.setdefault(name, set()).add(j)
    keep_sets = {s.name: [j for j in range(s.rank) if j not in gone.get(s.name, ())] for s in specs}
    return _finish(specs, {k: len(v) for k, v in keep_sets.items()}, keep_sets, cost_of, strategy, ordered,
                   ratio, trace, removed)


class _Pools:
    """The candidate heaps of one strategy, with deterministic tie-breaking by position."""

    def __init__(self, strategy: str):
        self.strategy = "zero-sum" if strategy == "zero-sum-2nd" else strategy  # same rule, other scores
        self.heaps: tuple[list, ...] = ([], []) if self.strategy == "zero-sum" else ([],)

    def push(self, i: int, j: int, d: float, sigma: float) -> None:
        """Candidate (matrix i, component j) with score d (a block's: the sum) and singular value sigma."""
        if self.strategy == "zero-sum":
            heapq.heappush(self.heaps[0 if d >= 0 else 1], (abs(d), i, j))
        elif self.strategy == "most-negative":
            heapq.heappush(self.heaps[0], (d, i, j))
        elif self.strategy == "abs-dl":
            heapq.heappush(self.heaps[0], (abs(d), i, j))
        else:  # sigma
            heapq.heappush(self.heaps[0], (sigma, i, j))

    def pop(self, running: float):
        if self.strategy == "zero-sum":
            positive, negative = self.heaps
            preferred, other = (positive, negative) if running <= 0 else (negative, positive)
            heap = preferred if preferred else other
        else:
            heap = self.heaps[0]
        if not heap:
            return None
        _, i, j = heapq.heappop(heap)
        return i, j


def _finish(specs, kept_counts, keep_sets, cost_of: _Cost, strategy, ordered, ratio, trace, removed) -> Selection:
    keep, dense, parts, cost = {}, {}, {}, 0.0
    for s in specs:
        k = kept_counts[s.name]
        indices = keep_sets[s.name] if keep_sets is not None else list(range(k))
        keep[s.name] = torch.tensor(indices, dtype=torch.long)
        dense[s.name] = cost_of.dense(s, k)
        cost += cost_of(s, k)
        if cost_of.parts(s, k):
            parts[s.name] = cost_of.parts(s, k)
    achieved = cost / sum(s.params for s in specs)
    return Selection(storage=cost_of.storage, strategy=strategy, ordered=ordered, target_ratio=ratio, keep=keep,
                     dense=dense, achieved_ratio=achieved, running_sum=trace, removed=removed,
                     group_size=cost_of.group_size, group_sizes=parts)
