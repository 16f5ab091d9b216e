"""Perplexity of compressed SmolLM2-135M under every strategy and storage mode (issue 2 and 5 tables).

One analysis (calibration pass, whitening, whitened SVD, scores) per calibration seed is shared by all
configurations; each configuration compresses a fresh copy of the model and is evaluated on several texts.
Results are appended to a JSON-lines file as they finish, so an interrupted run resumes where it stopped,
and the markdown tables are rebuilt from that file.

    python bench/quality.py --calib-file ../shared/data/wikitext-2/valid.txt \\
        --eval wikitext2=../shared/data/wikitext-2/test.txt --eval licenses=@licenses --eval pydoc=@pydoc \\
        --suite main --seeds 0 --results bench/results/quality.jsonl

``@licenses`` is the license texts of /usr/share/common-licenses (legal English, on every Debian system),
``@pydoc`` the docstrings of Python's standard library (technical English, wherever Python runs).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import zssvd
from zssvd.config import AnalysisOptions, CompressionConfig
from zssvd.evaluation.demo import stdlib_docstrings
from zssvd.evaluation.evaluate import perplexity
from zssvd.io.models import find_targets
from zssvd.pipeline import analyze, compress_, rescore
from zssvd.stages import calibration
from zssvd.stages.scores import sign_flips
from zssvd.stages.packing import unpack_model
from zssvd.stages.selection import select

LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0")
ABLATION = ("zero-sum", "most-negative", "abs-dl", "sigma")

# Weight-only quantisation of the same target linears, the alternative a user weighs ZS-SVD against
# (issue 15): name -> (quantiser, bits, group along the input dim; None = one symmetric scale per row).
BASELINES = {
    "rtn-int8-row": ("rtn", 8, None),
    "rtn-int4-g64": ("rtn", 4, 64),
    "rtn-int3-g64": ("rtn", 3, 64),
    "hqq-int4-g64": ("hqq", 4, 64),
    "hqq-int3-g64": ("hqq", 3, 64),
}


def as_16bit(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16, as a format stores its scales and zero points."""
    return x.to(torch.float16).to(x.dtype)


def rtn_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest, one 16-bit scale per output row; codes in [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    top = 2 ** (bits - 1) - 1
    scale = as_16bit(w.abs().amax(dim=1, keepdim=True) / top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return torch.clamp(torch.round(w / scale), -top, top) * scale


def rtn_groups(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric round-to-nearest per ``group`` consecutive inputs of a row: w ~ scale * q + offset, q in
    [0, 2^b - 1], scale and offset (the zero point, -offset / scale, left unrounded) in 16 bits each."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    offset = as_16bit(g.amin(dim=-1, keepdim=True))
    top = 2 ** bits - 1
    scale = as_16bit((g.amax(dim=-1, keepdim=True) - offset) / top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is its offset
    q = torch.clamp(torch.round((g - offset) / scale), 0, top)
    return (q * scale + offset).reshape(rows, cols)


def hqq_groups(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """HQQ (calibration-free, optimises each group's zero point): the same layout and bytes as
    ``rtn_groups``, its scales and zero points rounded to 16 bits as HQQ stores them."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as err:
        raise ImportError("HQQ baselines need the hqq package: pip install --no-deps hqq termcolor") from err

    q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, axis=1, optimize=True,
                                 round_zero=False, bitpack=False, device=str(w.device))
    meta.update(scale=as_16bit(meta["scale"]), zero=as_16bit(meta["zero"]), compute_dtype=torch.float32)
    return Quantizer.dequantize(q, meta).to(w.dtype)


def quantised_bytes(shape: tuple[int, int], bits: int, group: int | None) -> int:
    """Bytes of one quantised matrix: packed codes, plus a 16-bit scale per row (group None) or a
    16-bit scale and a 16-bit zero point per group."""
    rows, cols = shape
    if group is not None and cols % group:
        raise ValueError(f"a {rows}x{cols} matrix does not split into groups of {group} inputs; pick a divisor")
    metadata = 2 * rows if group is None else 4 * rows * (cols // group)
    return math.ceil(rows * cols * bits / 8) + metadata


def fake_quantise_(model, name: str) -> float:
    """Quantise then de-quantise every target weight of ``model`` in place with baseline ``name``;
    returns the targets' quantised bytes over their 16-bit bytes."""
    method, bits, group = BASELINES[name]
    stored = dense = 0
    for target in find_targets(model):
        w = target.module.weight
        stored += quantised_bytes(tuple(w.shape), bits, group)
        dense += 2 * w.numel()
        with torch.no_grad():
            if method == "hqq":
                w.copy_(hqq_groups(w.double(), bits, group))
            else:
                w.copy_(rtn_rows(w.double(), bits) if group is None else rtn_groups(w.double(), bits, group))
    return stored / dense


def available_baselines() -> list[str]:
    """The baselines that can run here: HQQ rows need the ``hqq`` package (pip install --no-deps hqq)."""
    have_hqq = importlib.util.find_spec("hqq") is not None
    return [name for name, (method, _, _) in BASELINES.items() if method != "hqq" or have_hqq]


def builtin_text(name: str) -> str:
    if name == "@pydoc":
        return stdlib_docstrings()
    if name == "@licenses":
        root = Path("/usr/share/common-licenses")
        return "\n\n".join((root / n).read_text() for n in LICENSES if (root / n).is_file())
    return Path(name).read_text()


def suite_configs(suite: str, ratios: list[float], corrections: int, group_sizes=(64,)) -> list[dict]:
    """The configurations of a suite, as ``zssvd.CompressionConfig`` fields (int4 rows once per group size;
    64, the default, is left out of the fields so that older rows keep their keys)."""
    configs = []
    for r in ratios:
        if suite in ("issue2", "main"):
            configs += [dict(ratio=r, strategy=s) for s in ("uniform", "zero-sum", "zero-sum-2nd")]
            if corrections:
                configs += [dict(ratio=r, strategy="zero-sum", corrections=corrections)]
        if suite == "main":
            configs += [dict(ratio=r, storage="remap", strategy=s) for s in ("uniform", "zero-sum", "zero-sum-2nd")]
            if r <= 0.5:
                configs += [dict(ratio=r, storage="hq", strategy=s) for s in ("uniform", "zero-sum", "zero-sum-2nd")]
            if r <= 0.2813:  # int4 factors: at or below the bytes of int4 round-to-nearest (4.5 bits with scales)
                configs += [dict(ratio=r, storage="int4", strategy=s, **({} if g == 64 else {"group_size": g}))
                            for g in group_sizes for s in ("uniform", "zero-sum", "zero-sum-2nd")]
        if suite == "ablation":
            configs += [dict(ratio=r, strategy=s, ordered=o) for s in ABLATION for o in (True, False)]
    return configs


def config_key(seed: int, config: dict) -> str:
    full = {"seed": seed, "storage": "dense", "strategy": "zero-sum", "ordered": True, "corrections": 0, **config}
    return json.dumps(full, sort_keys=True)


def run(args) -> None:
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in results_path.read_text().splitlines()} if results_path.exists() else set()
    model, tokenizer, source = zssvd.load_model(args.model)
    evals = {}
    for spec in args.eval:
        name, _, path = spec.partition("=")
        evals[name] = calibration.tokenize_stream(tokenizer, builtin_text(path))
    windows = dict(pair.split("=") for pair in args.eval_windows) if args.eval_windows else {}
    bos = _bos(tokenizer, args)
    bos_key = {"bos": True} if bos is not None else {}  # in the keys only when used: older rows keep theirs

    def evaluate(m) -> dict:
        return {name: round(perplexity(m, ids, args.seq_len, max_windows=int(windows.get(name, args.windows)),
                                       desc=f"ppl {name}", bos_id=bos)["perplexity"], 3)
                for name, ids in evals.items()}

    def record(entry: dict) -> None:
        with results_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    dense_key = json.dumps({"dense": True, "evals": sorted(evals), **bos_key})
    if dense_key not in done:
        record({"key": dense_key, "dense": True, **bos_key, "ppl": evaluate(model)})
    for name in (args.baselines or available_baselines()) if args.suite == "baselines" else []:
        key = json.dumps({"baseline": name, **bos_key})
        if key not in done:
            start = time.perf_counter()
            quantised = copy.deepcopy(model)
            stored = fake_quantise_(quantised, name)
            method, bits, group = BASELINES[name]
            record({"key": key, "baseline": name, "method": method, "bits": bits, "group": group, **bos_key,
                    "bytes_ratio": round(stored, 5), "ppl": evaluate(quantised),
                    "seconds": round(time.perf_counter() - start, 1)})
    for seed in args.seeds:
        configs = [{**c, **bos_key} for c in suite_configs(args.suite, args.ratios, args.corrections, args.group_sizes)]
        configs = [c for c in configs if config_key(seed, c) not in done
                   and (not args.strategies or c["strategy"] in args.strategies)
                   and (not args.storages or c.get("storage", "dense") in args.storages)
                   and not (args.ordered_only and c.get("ordered") is False)]
        flips = [other for other in args.sign_flip or [] if _sign_flip_key(other, seed, args) not in done]
        if not configs and not flips:
            continue
        calib = _calibration(tokenizer, args, seed)
        analysis = analyze(model, calib, AnalysisOptions(cache_dir=args.cache_dir, source=source))
        for other in flips:
            record({"key": _sign_flip_key(other, seed, args), "seed": seed,
                    "signflip": _sign_flip_rows(model, analysis, tokenizer, other, args, seed)})
        for config in configs:
            start = time.perf_counter()
            # rows without a group size are g = 64 (the library's default became "auto" later)
            settings = CompressionConfig(**{"group_size": 64, **{k: v for k, v in config.items() if k != "bos"}})
            compressed, report = compress_(copy.deepcopy(model), calib, settings, analysis=analysis)
            if args.dequantised:  # the same stored values through plain float layers: the format's quality, faster
                unpack_model(compressed)
            record({"key": config_key(seed, config), "seed": seed, **json.loads(config_key(seed, config)),
                    "achieved_ratio": round(report["achieved_ratio"], 5),
                    "achieved_bytes_ratio": round(report["achieved_bytes_ratio"], 5),
                    "bytes_ratio": round(report["achieved_bytes_ratio"], 5),
                    "calib_source": calib.source, "ppl": evaluate(compressed),
                    **({"evaluated": "dequantised"} if args.dequantised else {}),
                    "correction_losses": report["correction_losses"],
                    **({"group_size_counts": group_size_counts(report)} if "group_size" in config else {}),
                    "seconds": round(time.perf_counter() - start, 1)})


def _bos(tokenizer, args) -> int | None:
    """The BOS id every evaluation and calibration window starts with (None: the tokenizer adds none)."""
    return None if args.no_bos else calibration.bos_token_id(tokenizer)


def _sign_flip_key(other: str, seed: int, args) -> str:
    return json.dumps({"signflip": other, "seed": seed, "calib": args.calib_file})


def _sign_flip_rows(model, analysis, tokenizer, other: str, args, seed: int) -> dict:
    """Sign agreement of dL between the calibration corpus and ``other`` (same components), over all
    components and over those zero-sum removes at each ratio."""
    ids = calibration.tokenize_stream(tokenizer, builtin_text(other))
    bos = _bos(tokenizer, args)
    windows = calibration.sample_windows(ids, args.calib_samples, args.seq_len, seed, what=other, bos=bos)
    other_scores = rescore(model, analysis, calibration.CalibrationSet(windows, other, bos=bos is not None))
    rows = {"all": sign_flips(analysis.scores, other_scores)}
    sigmas = {n: f.sigma for n, f in analysis.factors.items()}
    for ratio in args.ratios:
        sel = select(analysis.specs, analysis.scores, sigmas, ratio=ratio)
        removed = {}
        for name, j in sel.removed:
            removed.setdefault(name, []).append(j)
        among = {n: torch.tensor(removed.get(n, []), dtype=torch.long) for n in analysis.scores}
        rows[f"removed at {ratio}"] = sign_flips(analysis.scores, other_scores, among=among)
    return {"other": other, "calib": "+".join(args.calib_file), **rows}


def _calibration(tokenizer, args, seed: int) -> calibration.CalibrationSet:
    """Seeded windows of the calibration texts (files, @licenses, @pydoc), equally weighted; or, with
    --calib-contiguous, the first N x L tokens of the first text cut into N windows (no seed)."""
    if args.calib_contiguous:
        ids = calibration.tokenize_stream(tokenizer, builtin_text(args.calib_file[0]))
        bos = _bos(tokenizer, args)
        windows = calibration.sample_windows(ids, args.calib_samples, args.seq_len, 0, args.calib_file[0],
                                             contiguous=True, bos=bos)
        return calibration.CalibrationSet(windows, f"{Path(args.calib_file[0]).name}[:{windows.numel()}]",
                                          bos=bos is not None)
    texts = {Path(s).name: builtin_text(s) for s in args.calib_file}
    return calibration.from_texts(tokenizer, texts, args.calib_samples, args.seq_len, seed,
                                  use_bos=not args.no_bos)


def markdown(results_path: Path) -> str:
    """Tables: mean perplexity over seeds (per-seed values in brackets) for every configuration."""
    rows = [json.loads(line) for line in results_path.read_text().splitlines()]
    flips = [r for r in rows if "signflip" in r]
    rows = [r for r in rows if "signflip" not in r]
    dense = next((r for r in rows if r.get("dense")), None)
    evals = list(dense["ppl"]) if dense else sorted({k for r in rows for k in r["ppl"]})
    baselines = [r for r in rows if "baseline" in r]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("dense") and "baseline" not in r:
            groups.setdefault((r["ratio"], storage_label(r), r["strategy"], r["ordered"], r["corrections"]), []).append(r)
    lines = ["| ratio | storage | strategy | order | corrections | achieved | bytes | " + " | ".join(evals) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(evals)]
    if dense:
        lines.append("| 1.0 | (dense model) | | | | 1.0 | 1.0 | "
                     + " | ".join(f"{dense['ppl'][e]:.2f}" for e in evals) + " |")
    for r in sorted(baselines, key=lambda r: -r["bytes_ratio"]):
        lines.append(f"| | {r['baseline']} | (weight quantisation) | | | | {r['bytes_ratio']:.4f} | "
                     + " | ".join(_cell([r], e) for e in evals) + " |")
    for (ratio, storage, strategy, ordered, corr), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0])):
        achieved = statistics.mean(g["achieved_ratio"] for g in group)
        lines.append(f"| {ratio} | {storage} | {strategy} | {'yes' if ordered else 'no'} | {corr} | "
                     f"{achieved:.4f} | {statistics.mean(bytes_ratio(g) for g in group):.4f} | "
                     + " | ".join(_cell(group, e) for e in evals) + " |")
    lines += ["", frontier(groups, baselines, evals)]
    if flips:
        lines += ["", "| calibration | scored on | seed | components | sign flips | \\|dL\\|-weighted flips | pearson |",
                  "|---|---|---|---|---|---|---|"]
        for r in flips:
            f = r["signflip"]
            calib = "+".join(Path(c).name for c in f["calib"].split("+"))
            other = Path(f["other"]).name
            for subset, stats in f.items():
                if isinstance(stats, dict):
                    lines.append(f"| {calib} | {other} ({subset}) | {r['seed']} | {stats['components']} | "
                                 f"{stats['flip_rate']:.3f} | {stats['weighted_flip_rate']:.3f} | "
                                 f"{stats['pearson']:.3f} |")
    return "\n".join(lines)


def group_size_counts(report: dict) -> dict[str, int]:
    """How many stored int4 matrices of each part took each group size, e.g. {"u g=32": 40, "weight g=64": 75}."""
    counts: dict[str, int] = {}
    for parts in report["int4_group_sizes"].values():
        for part, g in parts.items():
            counts[f"{part} g={g}"] = counts.get(f"{part} g={g}", 0) + 1
    return dict(sorted(counts.items()))


def storage_label(row: dict) -> str:
    """The row's storage, with int4's group size when it is not the default 64 (e.g. "int4 g=auto")."""
    return row["storage"] + (f" g={row['group_size']}" if "group_size" in row else "")


def bytes_ratio(row: dict) -> float:
    """Stored bytes of the targets over their 16-bit bytes. Rows recorded before ``bytes_ratio`` existed:
    dense factors carry no scales, so at 16 bits their bytes are the achieved ratio (those rows'
    ``achieved_bytes_ratio`` counted the float32 model dtype); remap / hq rows counted their real bytes."""
    if "bytes_ratio" in row:
        return row["bytes_ratio"]
    return row["achieved_ratio"] if row["storage"] == "dense" else row["achieved_bytes_ratio"]


def frontier(groups: dict[tuple, list[dict]], baselines: list[dict], evals: list[str]) -> str:
    """Every method's perplexity against its bytes (fraction of the targets' 16-bit bytes), fewest bytes first."""
    points = [(r["bytes_ratio"], f"{r['baseline']}", [r]) for r in baselines]
    for (ratio, storage, strategy, ordered, corr), group in groups.items():
        name = f"ZS-SVD {storage} {strategy} {ratio}" + ("" if ordered else " unordered")
        name += f" x{corr}" if corr else ""
        points.append((statistics.mean(bytes_ratio(g) for g in group), name, group))
    lines = ["| bytes | method | " + " | ".join(evals) + " |", "|---|---|" + "---|" * len(evals)]
    for stored, name, group in sorted(points, key=lambda p: (p[0], p[1])):
        lines.append(f"| {stored:.4f} | {name} | " + " | ".join(_cell(group, e) for e in evals) + " |")
    return "\n".join(lines)


def _cell(group: list[dict], evaluation: str) -> str:
    """Mean perplexity over the group's seeds, each seed's value in brackets when there are several."""
    values = [g["ppl"][evaluation] for g in sorted(group, key=lambda g: g.get("seed", 0))]
    mean = statistics.mean(values)
    return f"{mean:.2f}" + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--calib-file", action="append", required=True, help="path, @licenses or @pydoc (repeatable)")
    p.add_argument("--eval", action="append", required=True, metavar="NAME=PATH", help="PATH, @licenses or @pydoc")
    p.add_argument("--suite", choices=("issue2", "main", "ablation", "baselines"), default="main",
                   help="baselines: round-to-nearest int8/int4/int3 and HQQ of the same targets (no calibration)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--strategies", nargs="+", default=None, help="run only these strategies of the suite")
    p.add_argument("--storages", nargs="+", default=None, choices=("dense", "remap", "hq", "int4"),
                   help="run only these storages of the suite")
    p.add_argument("--dequantised", action="store_true",
                   help="evaluate the packed layers de-quantised to the model's dtype (same stored values; "
                        "the packed CPU paths may re-encode, e.g. fp8 as int8, and are slower in float32)")
    p.add_argument("--ordered-only", action="store_true", help="skip the ablation's rows without the in-matrix order")
    p.add_argument("--corrections", type=int, default=5)
    p.add_argument("--calib-contiguous", action="store_true",
                   help="calibrate on the first N x L tokens of the first --calib-file instead of random windows")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=24, help="evaluation windows per text (default 24)")
    p.add_argument("--eval-windows", nargs="*", metavar="NAME=N", help="per-text override of --windows")
    p.add_argument("--sign-flip", action="append", metavar="PATH",
                   help="also report how often dL changes sign when scored on this corpus (path, @licenses, @pydoc)")
    p.add_argument("--baselines", nargs="+", choices=list(BASELINES), metavar="NAME",
                   help=f"run only these baselines, in this order (default: all that can run; {', '.join(BASELINES)})")
    p.add_argument("--no-bos", action="store_true",
                   help="windows without the BOS token even when the tokenizer adds one (default: with it)")
    p.add_argument("--cache-dir", default=str(zssvd.io.models.cache_root() / "stages"))
    p.add_argument("--results", default="bench/results/quality.jsonl")
    p.add_argument("--group-sizes", nargs="+", default=[64], type=lambda t: t if t == "auto" else int(t), metavar="G",
                   help="int4 rows: one per group size, e.g. 64 auto (default 64; auto: chosen by measurement)")
    p.add_argument("--tables-only", action="store_true", help="print the markdown tables from --results and exit")
    args = p.parse_args(argv)
    if not args.tables_only:
        run(args)
    print(markdown(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
