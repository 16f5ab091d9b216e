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
candidate. ``ordered=False`` lets any component of any matrix go at any time.

Storage accounting, in 16-bit-parameter units, for a matrix m x n keeping k components:

* ``dense``: min(mn, k(m+n)) -- a factor pair pays off only below r* = mn/(m+n); above it
  the original matrix is kept dense;
* ``remap``: k max(m, n) -- both factors' overlapping part in 8 bits, two to a 16-bit slot;
* ``hq``: half of dense's cost -- every stored parameter in 8 bits (fp8).

The budget is ``ratio x`` the targets' dense parameters; the result is the first point where
the stored size is at or below it, so the achieved ratio never exceeds the target and falls
short of it by at most one component's cost.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

STRATEGIES = ("zero-sum", "zero-sum-2nd", "uniform", "most-negative", "abs-dl", "sigma")
STORAGES = ("dense", "remap", "hq")


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


def storage_cost(storage: str, m: int, n: int, k: int) -> float:
    """Stored size, in 16-bit parameters, of an m x n matrix that keeps k components."""
    if storage == "dense":
        return float(min(m * n, k * (m + n)))
    if storage == "remap":
        return float(min(m * n, k * max(m, n)))
    if storage == "hq":
        return 0.5 * min(m * n, k * (m + n))
    raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")


def stays_dense(storage: str, m: int, n: int, k: int) -> bool:
    """Whether a matrix keeping k components is cheaper (or no dearer) stored as a full matrix."""
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

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(idx.numel()) for name, idx in self.keep.items()}


def check_ratio_range(ratio: float, storage: str) -> None:
    """The checks that need no model: 0 < ratio < 1, a known storage, hq at most 0.5."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not 0.0 < ratio < 1.0:
        raise RatioError(f"ratio must lie strictly between 0 and 1 (the fraction of the targets' storage "
                         f"to keep), got {ratio}")
    if storage == "hq" and ratio > 0.5:
        raise RatioError(f"hq storage keeps every parameter in 8 bits, so even uncompressed ranks reach ratio "
                         f"0.5; for ratio {ratio} use --storage remap or --storage dense")


def check_ratio(specs: list[MatrixSpec], ratio: float, storage: str, min_rank: int = 1) -> None:
    """Raise a RatioError naming the reachable range when ``ratio`` cannot be met."""
    check_ratio_range(ratio, storage)
    total = sum(s.params for s in specs)
    floor = sum(storage_cost(storage, s.out_features, s.in_features, min(min_rank, s.rank)) for s in specs) / total
    if ratio < floor:
        raise RatioError(f"ratio {ratio} is below the smallest reachable with {storage} storage "
                         f"({floor:.4f}, every matrix at rank {min_rank}); choose a larger ratio")


def select(specs: list[MatrixSpec], scores: dict[str, torch.Tensor], sigmas: dict[str, torch.Tensor], *,
           ratio: float, storage: str = "dense", strategy: str = "zero-sum", ordered: bool = True,
           min_rank: int = 1, curvature: dict[str, torch.Tensor] | None = None) -> Selection:
    """Choose kept components for every matrix so that the stored size meets ``ratio``.

    ``curvature`` (second-order terms, per component) is required by ``zero-sum-2nd``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_ratio(specs, ratio, storage, min_rank)
    if strategy == "zero-sum-2nd":
        if curvature is None:
            raise ValueError("strategy zero-sum-2nd needs the second-order terms (zssvd.stages.curvature)")
        scores = {name: scores[name].double() + curvature[name].double() for name in scores}
    if strategy == "uniform":
        kept = {s.name: _uniform_rank(s, ratio, storage) for s in specs}
        return _finish(specs, kept, None, storage, strategy, ordered, ratio, [], [])
    return _greedy(specs, scores, sigmas, ratio, storage, strategy, ordered, min_rank)


def _uniform_rank(spec: MatrixSpec, ratio: float, storage: str) -> int:
    """The largest k whose storage is at most ``ratio`` of the matrix's (SVD-LLM's rule for dense)."""
    m, n = spec.out_features, spec.in_features
    limit = ratio * m * n
    if storage == "dense":
        k = int(limit // (m + n))
    elif storage == "remap":
        k = int(limit // max(m, n))
    else:  # hq: half price per parameter; a matrix may even stay dense in 8 bits
        k = spec.rank if 0.5 * m * n <= limit else int(2 * limit // (m + n))
    return max(0, min(k, spec.rank))


def _greedy(specs, scores, sigmas, ratio, storage, strategy, ordered, min_rank) -> Selection:
    total = sum(s.params for s in specs)
    budget = ratio * total
    dl = [scores[s.name].double().tolist() for s in specs]
    sg = [sigmas[s.name].double().tolist() for s in specs]
    for s, values in zip(specs, dl):
        if len(values) != s.rank:
            raise ValueError(f"{s.name}: {len(values)} scores for a rank-{s.rank} matrix")
    kept = [s.rank for s in specs]
    cost = sum(storage_cost(storage, s.out_features, s.in_features, s.rank) for s in specs)
    pools = _Pools(strategy, dl, sg)
    for i, s in enumerate(specs):
        for j in ([s.rank - 1] if ordered else range(s.rank)):
            pools.push(i, j)
    running, trace, removed = 0.0, [], []
    # The rule stops at the first point at or below the budget (tiny slack for float sums).
    while cost > budget * (1 + 1e-12):
        entry = pools.pop(running)
        if entry is None:
            raise RatioError(f"ran out of components before reaching ratio {ratio} (min rank {min_rank})")
        i, j = entry
        s = specs[i]
        if kept[i] <= min_rank:
            continue  # this matrix is exhausted; discard its candidate
        m, n = s.out_features, s.in_features
        cost += storage_cost(storage, m, n, kept[i] - 1) - storage_cost(storage, m, n, kept[i])
        kept[i] -= 1
        running += dl[i][j]
        trace.append(running)
        removed.append((s.name, j))
        if ordered and kept[i] > min_rank:
            pools.push(i, j - 1)
    gone: dict[str, set[int]] = {}
    for name, j in removed:
        gone.setdefault(name, set()).add(j)
    keep_sets = {s.name: [j for j in range(s.rank) if j not in gone.get(s.name, ())] for s in specs}
    return _finish(specs, {k: len(v) for k, v in keep_sets.items()}, keep_sets, storage, strategy, ordered,
                   ratio, trace, removed)


class _Pools:
    """The candidate heaps of one strategy, with deterministic tie-breaking by position."""

    def __init__(self, strategy: str, dl: list[list[float]], sigma: list[list[float]]):
        self.dl, self.sigma = dl, sigma
        self.strategy = "zero-sum" if strategy == "zero-sum-2nd" else strategy  # same rule, other scores
        self.heaps: tuple[list, ...] = ([], []) if self.strategy == "zero-sum" else ([],)

    def push(self, i: int, j: int) -> None:
        d = self.dl[i][j]
        if self.strategy == "zero-sum":
            heapq.heappush(self.heaps[0 if d >= 0 else 1], (abs(d), i, j))
        elif self.strategy == "most-negative":
            heapq.heappush(self.heaps[0], (d, i, j))
        elif self.strategy == "abs-dl":
            heapq.heappush(self.heaps[0], (abs(d), i, j))
        else:  # sigma
            heapq.heappush(self.heaps[0], (self.sigma[i][j], i, j))

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


def _finish(specs, kept_counts, keep_sets, storage, strategy, ordered, ratio, trace, removed) -> Selection:
    keep, dense, cost = {}, {}, 0.0
    for s in specs:
        k = kept_counts[s.name]
        m, n = s.out_features, s.in_features
        indices = keep_sets[s.name] if keep_sets is not None else list(range(k))
        keep[s.name] = torch.tensor(indices, dtype=torch.long)
        dense[s.name] = stays_dense(storage, m, n, k)
        cost += storage_cost(storage, m, n, k)
    achieved = cost / sum(s.params for s in specs)
    return Selection(storage=storage, strategy=strategy, ordered=ordered, target_ratio=ratio, keep=keep,
                     dense=dense, achieved_ratio=achieved, running_sum=trace, removed=removed)
