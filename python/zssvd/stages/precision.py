"""Stage 5b (int4 precision) -- a group size per factor and per matrix, chosen by measurement.

With ``--storage int4 --group-size auto`` the selection first chooses ranks with g = 64. Then every
stored int4 matrix -- V^T and U of a factor pair, or the weight of a matrix kept dense -- is an
*item* that may take any group size in ``CANDIDATE_GROUPS`` (4 + 32/g bits per weight: 5.0, 4.5,
4.25, 4.125). For each item and each g we quantise it and measure the error that causes where it
matters, at the layer's output under the calibration activations: with S S^T = C (the whitening
factor of the inputs' covariance C, the mean of x x^T over the calibration tokens; ``whitening``),

    error = ||(W' - W'_hat) S||_F^2 = mean over calibration tokens of ||(W' - W'_hat) x||^2,

where W'_hat replaces only that item by its quantised form (W'_hat = U V_hat^T for V, U_hat V^T for
U, Q(W) for a dense weight). The errors of V and U add up to first order, so the two factors are
chosen separately.

Allocation: every item starts at its cheapest group size (in exact bytes); then, greedily, the
upgrade with the largest error reduction per extra byte is taken while it fits into the same budget
the selection used (``ratio`` x the targets' 16-bit size), so the achieved ratio stays exact and at
or below the target.

The pipeline runs it twice (``pipeline._measured_precisions``): at the ranks of the g = 64
selection, then at the ranks the selection chooses again with those group sizes in its costs --
the first allocation frees bytes (a rank-20 U no longer pays for groups of 64) that the ranks
should get back. The final choice is the second allocation, within budget by construction.

One caveat: the error is an output error, not a loss change, so two layers with the same error count
the same even when the loss is more sensitive to one of them (what it gives on SmolLM2:
bench/RESULTS.md, "int4 group sizes chosen by measurement").
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch

from .decompose import Factors
from .selection import Selection, int4_matrix_cost

CANDIDATE_GROUPS = (32, 64, 128, 256)  # all take torch's vectorised CPU int4 kernel (ops/int4/cpu.py)


@dataclass
class Item:
    """One stored int4 matrix: ``part`` "weight", "v" or "u" of target ``name``, with the cost (16-bit
    parameters: exact bytes / 2) and the measured output error of each candidate group size."""

    name: str
    part: str
    costs: dict[int, float]
    errors: dict[int, float]


def all_parts(group_sizes: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Every matrix's chosen sizes as {"weight", "v", "u"} for the selection's costs: a matrix kept
    dense prices a factor pair at its own size, a factorised one its dense form at V^T's (the part
    reducing over the same inputs)."""
    spread = {}
    for name, parts in group_sizes.items():
        g = parts.get("weight", parts.get("v"))
        spread[name] = {"weight": g, "v": parts.get("v", g), "u": parts.get("u", g)}
    return spread


def choose_precisions(selection: Selection, weights: dict[str, torch.Tensor], truncated: dict[str, Factors],
                      whitening: dict[str, torch.Tensor], groups: dict[str, str],
                      candidates: tuple[int, ...] = CANDIDATE_GROUPS) -> Selection:
    """``selection`` (int4, ranks chosen) with a measured group size for every stored matrix.

    ``weights``: every target's original weight; ``truncated``: the kept factors of the factorised
    ones; ``whitening``: S per input group; ``groups``: target name -> its input group.
    """
    if selection.storage != "int4":
        raise ValueError(f"measured group sizes are an int4 feature; this selection stores {selection.storage!r}")
    items = [item for name in selection.keep
             for item in measure(name, selection.dense[name], weights[name], truncated.get(name),
                                 whitening[groups[name]], candidates)]
    total = sum(w.numel() for w in weights.values())
    chosen = allocate(items, selection.target_ratio * total)
    group_sizes: dict[str, dict[str, int]] = {}
    errors: dict[str, dict[str, dict[int, float]]] = {}
    for item in items:
        group_sizes.setdefault(item.name, {})[item.part] = chosen[item.name, item.part]
        errors.setdefault(item.name, {})[item.part] = item.errors
    cost = sum(item.costs[chosen[item.name, item.part]] for item in items)
    return replace(selection, group_sizes=group_sizes, precision_errors=errors, achieved_ratio=cost / total)


@torch.no_grad()
def measure(name: str, dense: bool, weight: torch.Tensor, factors: Factors | None, S: torch.Tensor,
            candidates: tuple[int, ...]) -> list[Item]:
    """The items of one target and their measured errors (float32 products, float64 sums)."""
    S = S.to(device=weight.device, dtype=torch.float32)
    if dense:
        W = weight.detach().float()
        return [_item(name, "weight", W, lambda delta: delta @ S, candidates)]
    U, V = (t.to(weight.device).float() for t in factors.balanced_factors())  # W' = U V^T, as packing stores them
    VtS = V.T @ S  # U's error reaches the output through V^T S
    return [_item(name, "v", V.T.contiguous(), lambda delta: U @ (delta @ S), candidates),
            _item(name, "u", U, lambda delta: delta @ VtS, candidates)]


def _item(name: str, part: str, matrix: torch.Tensor, to_output, candidates: tuple[int, ...]) -> Item:
    """Quantise ``matrix`` (rows x K, groups along K) at every g; ``to_output`` maps its error to the output's."""
    from zskernels.formats.int4 import dequantize_int4, quantize_int4  # on first use: zssvd imports no zskernels

    rows, K = matrix.shape
    errors = {}
    for g in candidates:
        delta = matrix - dequantize_int4(quantize_int4(matrix, g))
        errors[g] = float(to_output(delta).double().square().sum())
    return Item(name, part, {g: int4_matrix_cost(rows, K, g) for g in candidates}, errors)


def allocate(items: list[Item], budget: float) -> dict[tuple[str, str], int]:
    """Cheapest group size for every item, then the best error reduction per extra byte while it fits.

    Raises a ValueError when even the cheapest choices exceed ``budget`` (16-bit parameters).
    """
    choice = {(it.name, it.part): min(it.costs, key=lambda g: (it.costs[g], it.errors[g])) for it in items}
    spent = sum(it.costs[choice[it.name, it.part]] for it in items)
    if spent > budget:
        raise ValueError(f"the cheapest int4 group sizes cost {spent:.0f} 16-bit parameters, above the budget "
                         f"{budget:.0f}; choose a larger ratio")
    heap: list = []

    def push(index: int) -> None:  # the item's best upgrade that still fits, if any
        it = items[index]
        current = choice[it.name, it.part]
        best = _best_upgrade(it, current, budget - spent)
        if best is not None:
            gain, g = best
            heapq.heappush(heap, (-gain, index, current, g))

    for index in range(len(items)):
        push(index)
    while heap:
        _, index, was, g = heapq.heappop(heap)
        it = items[index]
        extra = it.costs[g] - it.costs[was]
        if choice[it.name, it.part] != was:
            continue  # stale: this item was upgraded since
        if spent + extra > budget:
            push(index)  # the budget left shrank: the best upgrade that still fits, if any
            continue
        choice[it.name, it.part] = g
        spent += extra
        push(index)
    return choice


def _best_upgrade(item: Item, current: int, room: float) -> tuple[float, int] | None:
    """(error reduction per extra 16-bit parameter, g) of the best upgrade costing at most ``room`` more."""
    best = None
    for g, cost in item.costs.items():
        extra, gain = cost - item.costs[current], item.errors[current] - item.errors[g]
        if 0 < extra <= room and gain > 0 and (best is None or gain / extra > best[0]):
            best = (gain / extra, g)
    return best
