"""Stage 4 (score) -- first-order loss change of removing each singular component.

Setting sigma_i to zero changes the whitened weight by -sigma_i u_i v_i^T, i.e. the weight by
dW = -sigma_i u_i v_i^T S^{-1} = -sigma_i u_i z_i^T, so to first order

    dL_i = <G, dW> = -sigma_i u_i^T G z_i = -sigma_i u_i^T (G S^{-T}) v_i,

with G = dL/dW from the gradient pass. dL_i is signed: removing some components is predicted
to lower the calibration loss. The bilinear forms are computed by ``zskernels.sigma_scores``
(a fused Triton kernel on the GPU, its torch reference elsewhere).
"""
from __future__ import annotations

import torch

from .decompose import Factors


def component_scores(factors: Factors, grad: torch.Tensor, *, backend: str = "auto",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """dL_i for every component of one matrix (float64, ordered like ``factors.sigma``).

    Computed on ``device`` (default: where the factors are); returned beside the factors.
    """
    import zskernels  # on first use: importing zssvd does not import Triton

    home = factors.sigma.device
    on = torch.device(device) if device is not None else factors.U.device
    U, Z = factors.U.to(on), factors.Z.to(on)
    bilinear = zskernels.sigma_scores(U, grad.to(device=on, dtype=U.dtype), Z, backend=backend)
    return -(factors.sigma.double().to(on) * bilinear.double()).to(home)


def sign_flips(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], among=None) -> dict:
    """How often two score sets (same components, e.g. two calibration corpora) disagree in sign.

    ``flip_rate`` counts components; ``weighted_flip_rate`` weighs each by its mean |dL|, so
    flips of negligible components matter little. ``among`` ({name: indices}) restricts the count,
    e.g. to the components a selection removed.
    """
    xs, ys = [], []
    for name in a:
        idx = among[name] if among is not None else slice(None)
        xs.append(a[name].double()[idx])
        ys.append(b[name].double()[idx])
    x, y = torch.cat(xs), torch.cat(ys)
    flipped = (x.sign() * y.sign()) < 0
    weight = 0.5 * (x.abs() + y.abs())
    return {"components": int(x.numel()), "flip_rate": float(flipped.double().mean()),
            "weighted_flip_rate": float((weight * flipped).sum() / weight.sum().clamp_min(1e-300)),
            "pearson": float(torch.corrcoef(torch.stack([x, y]))[0, 1])}
