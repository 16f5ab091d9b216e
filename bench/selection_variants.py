"""Experiments: selection rules that might beat zero-sum (issue 5), kept out of the library until one does.

Each variant changes one thing in the ordered zero-sum greedy of ``zssvd.stages.selection``:

* ``commit``: in dense storage a matrix still above r* = mn/(m+n) would be kept dense, so the
  components removed from it are not really gone; this variant adds their dL to the running sum
  only once the matrix drops below r* (the running sum then tracks the removals that stick);
* ``per-param``: heap keys are |dL| divided by the storage the removal frees (m+n, or max(m,n)
  for remap), i.e. predicted damage per freed parameter;
* ``second-order``: scores get the K-FAC / empirical-Fisher curvature term
  0.5 sigma_i^2 u_i^T A u_i, with A the (token-mean) outer product of per-token output gradients,
  collected by backward hooks in one extra gradient pass. (The input factor z_i^T C z_i is 1 in
  whitened coordinates.)

    python bench/selection_variants.py --calib-file ../shared/data/wikitext-2/valid.txt \\
        --eval-file ../shared/data/wikitext-2/test.txt --ratios 0.8 0.6 0.4
"""
from __future__ import annotations

import argparse
import copy
import heapq
import json
import sys

import torch

import zssvd
from zssvd.stages import calibration
from zssvd.evaluation.evaluate import perplexity
from zssvd.stages.gradients import calibration_pass
from zssvd.stages.packing import pack_model
from zssvd.pipeline import AnalysisOptions, analyze, truncate
from zssvd.stages.selection import DEFAULT_GROUP_SIZE, _Cost, _finish, select, storage_cost


def greedy(specs, scores, ratio, *, storage="dense", per_param=False, commit=False, min_rank=1):
    """Ordered zero-sum with the variant switches; returns a ``Selection``."""
    budget = ratio * sum(s.params for s in specs)
    dl = [scores[s.name].double().tolist() for s in specs]
    kept = [s.rank for s in specs]
    cost = sum(storage_cost(storage, s.out_features, s.in_features, s.rank) for s in specs)
    heaps: tuple[list, list] = ([], [])

    def push(i, j):
        s = specs[i]
        freed = max(s.out_features, s.in_features) if storage == "remap" else s.out_features + s.in_features
        key = abs(dl[i][j]) / freed if per_param else abs(dl[i][j])
        heapq.heappush(heaps[0 if dl[i][j] >= 0 else 1], (key, i, j))

    for i, s in enumerate(specs):
        push(i, s.rank - 1)
    running, pending, removed = 0.0, [0.0] * len(specs), []
    while cost > budget * (1 + 1e-12):
        preferred, other = heaps if running <= 0 else heaps[::-1]
        _, i, j = heapq.heappop(preferred or other)
        s = specs[i]
        m, n = s.out_features, s.in_features
        if kept[i] <= min_rank:
            continue
        cost += storage_cost(storage, m, n, kept[i] - 1) - storage_cost(storage, m, n, kept[i])
        kept[i] -= 1
        if commit and storage != "remap" and kept[i] * (m + n) >= m * n:
            pending[i] += dl[i][j]  # still above r*: would stay dense
        else:
            running += dl[i][j] + pending[i]
            pending[i] = 0.0
        removed.append((s.name, j))
        if kept[i] > min_rank:
            push(i, j - 1)
    keep = {s.name: list(range(kept[i])) for i, s in enumerate(specs)}
    return _finish(specs, {k: len(v) for k, v in keep.items()}, keep, _Cost(storage, DEFAULT_GROUP_SIZE), "variant", True,
                   ratio, [], removed)


def curvature_scores(model, analysis, calib) -> dict[str, torch.Tensor]:
    """0.5 sigma_i^2 u_i^T A u_i per component, A = mean over tokens of per-token output-gradient outer products."""
    targets = analysis.targets.rebind(model)
    total = calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)
    sums = {t.name: torch.zeros(t.shape[0], t.shape[0], dtype=torch.float64) for t in targets}

    def hook(name):
        def on_backward(module, grad_input, grad_output):
            g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
            sums[name] += (g.T @ g).double()
        return on_backward

    handles = [t.module.register_full_backward_hook(hook(t.name)) for t in targets]
    try:
        calibration_pass(model, targets, calib.input_ids, desc="gradient pass (curvature)")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, f in analysis.factors.items():
        A = sums[name] * total  # per-token gradients are total x the mean loss's; mean over tokens
        U = f.U.double()
        out[name] = 0.5 * f.sigma.double() ** 2 * ((U.T @ A) * U.T).sum(dim=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--calib-file", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--cache-dir", default=str(zssvd.io.models.cache_root() / "stages"))
    args = p.parse_args(argv)
    model, tokenizer, source = zssvd.load_model(args.model)
    calib = calibration.from_files(tokenizer, [args.calib_file], 32, 512, seed=args.seed)
    eval_ids = calibration.tokenize_stream(tokenizer, open(args.eval_file).read())
    analysis = analyze(model, calib, AnalysisOptions(cache_dir=args.cache_dir, source=source))
    curvature = curvature_scores(model, analysis, calib)
    second = {n: analysis.scores[n] + curvature[n] for n in analysis.scores}
    sigmas = {n: f.sigma for n, f in analysis.factors.items()}
    for ratio in args.ratios:
        variants = {
            "zero-sum": select(analysis.specs, analysis.scores, sigmas, ratio=ratio),
            "commit": greedy(analysis.specs, analysis.scores, ratio, commit=True),
            "per-param": greedy(analysis.specs, analysis.scores, ratio, per_param=True),
            "second-order": greedy(analysis.specs, second, ratio),
        }
        for name, selection in variants.items():
            compressed = copy.deepcopy(model)
            pack_model(compressed, analysis.targets.rebind(compressed), truncate(analysis, selection), selection)
            ppl = perplexity(compressed, eval_ids, 512, max_windows=args.windows, desc=name)["perplexity"]
            print(json.dumps({"ratio": ratio, "variant": name, "achieved": round(selection.achieved_ratio, 5),
                              "ppl": round(ppl, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
