"""Which 8-bit format should remap storage use: int8 (absmax/127) or fp8 e4m3 (absmax/448)?

Runs on the CPU (no kernels: pack_remap + unpack_remap, errors computed in float64) over
synthetic weights with a known SVD, W = P diag(sigma) Q^T (P, Q random orthogonal), kept at
rank k = 0.6 * rank as balanced factors U = P_k sqrt(S), V = Q_k sqrt(S), as the pipeline
passes them. Spectra: sigma_i ~ i^-0.5 (slow decay) and sigma_i ~ exp(-i / (rank/4)) (fast).
Two more families imitate the pipeline's whitened factors: W = P S Q^T D^-1 with lognormal
input-channel scales D (log-std 0.5, or 1.0 with 1/256 of the channels 30x larger), factored in
whitened coordinates, so V = D^-1 Q_k sqrt(S) has rows of very different sizes (ZS-SVD's V is
S^-T V_k sqrt(S), S the Cholesky factor of the activation covariance); their activations are
x = z D (z Gaussian), so the channels with the smallest V entries carry the largest inputs.

Reported per case and format (relative Frobenius norms):
  recon  = ||W - U_hat V_hat^T|| / ||W||       (truncation + quantisation)
  quant  = ||W_k - U_hat V_hat^T|| / ||W_k||   (quantisation alone; W_k = U V^T)
  output = ||x W_k^T - x W_hat^T|| / ||x W_k^T|| for 256 random tokens (quantisation alone)

On these synthetic cases fp8 has the smaller worst case and int8 the smaller typical error. The
library's default (int8) was then decided on a real model by perplexity: see bench/RESULTS.md
("Remap heads: int8 or fp8") and zskernels/README.md.

    python bench/remap_format_accuracy.py
"""
from __future__ import annotations

import math

import torch

from zskernels.formats.remap import FORMATS, pack_remap, unpack_remap

SHAPES = ((1024, 1024), (2048, 1024), (1024, 2048))  # (out, in): square, U big, V big
RATIO = 0.6
TOKENS = 256


def _orthogonal(n: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed columns


def _spectrum(kind: str, rank: int) -> torch.Tensor:
    i = torch.arange(1, rank + 1, dtype=torch.float64)
    return torch.exp(-i / (rank / 4)) if kind == "exp" else i.pow(-0.5)


# activation channel scales per family: (log-std, factor of the 1/256 outlier channels)
CHANNELS = {"power": (0.0, 1.0), "exp": (0.0, 1.0), "whitened-0.5": (0.5, 1.0), "whitened-1.0": (1.0, 30.0)}


def _channel_scales(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    log_std, outlier = CHANNELS[kind]
    d = torch.exp(log_std * torch.randn(n, generator=gen, dtype=torch.float64))
    d[torch.randperm(n, generator=gen)[: max(1, n // 256)]] *= outlier
    return d


def make_case(kind: str, out: int, in_: int, gen: torch.Generator):
    """(W, U, V, x): W exact, U V^T its balanced rank-k truncation, x activations."""
    rank = min(out, in_)
    k = round(RATIO * rank)
    p, q = _orthogonal(out, rank, gen), _orthogonal(in_, rank, gen)
    sigma = _spectrum(kind, rank)
    d = _channel_scales(kind, in_, gen)
    w = (p * sigma) @ q.t() / d
    root = sigma[:k].sqrt()
    u, v = p[:, :k] * root, (q[:, :k] * root) / d[:, None]
    x = torch.randn(TOKENS, in_, generator=gen, dtype=torch.float64) * d
    return w, u, v, x


def errors(w, u, v, x, fmt: str) -> dict[str, float]:
    u_hat, v_hat = (f.to(torch.float64) for f in unpack_remap(pack_remap(u, v, fmt=fmt)))
    w_k, w_hat = u @ v.t(), u_hat @ v_hat.t()
    rel = lambda a, b: float(torch.linalg.norm(a - b) / torch.linalg.norm(b))  # noqa: E731
    return {"recon": rel(w_hat, w), "quant": rel(w_hat, w_k), "output": rel(x @ w_hat.t(), x @ w_k.t())}


def main() -> dict[str, float]:
    """Print the table; return the worst-case output error per format."""
    gen = torch.Generator().manual_seed(0)
    print(f"k = {RATIO} * rank, balanced factors, tail fp16; relative Frobenius errors\n")
    print("| case | out x in | fmt | recon vs W | quant vs W_k | output vs x W_k^T |")
    print("|---|---|---|---|---|---|")
    outputs = {fmt: [] for fmt in FORMATS}
    for kind in CHANNELS:
        for out, in_ in SHAPES:
            w, u, v, x = make_case(kind, out, in_, gen)
            for fmt in FORMATS:
                e = errors(w, u, v, x, fmt)
                outputs[fmt].append(e["output"])
                print(f"| {kind} | {out}x{in_} | {fmt} | {e['recon']:.3e} | {e['quant']:.3e} | {e['output']:.3e} |")
    worst = {fmt: max(v) for fmt, v in outputs.items()}
    geo = {fmt: math.exp(sum(map(math.log, v)) / len(v)) for fmt, v in outputs.items()}
    print("\noutput error, worst case: " + ", ".join(f"{f} {w:.3e}" for f, w in worst.items())
          + "; geometric mean: " + ", ".join(f"{f} {g:.3e}" for f, g in geo.items()))
    print(f"-> smallest worst case: {min(worst, key=worst.get)!r}; smallest geometric mean: "
          f"{min(geo, key=geo.get)!r} (the library's default is decided by perplexity on a real model)")
    return worst


if __name__ == "__main__":
    main()
