"""int4 weight-only storage (group-wise, asymmetric, round-to-nearest): quantise, dequantise, layout, bytes.

One matrix W (N x K), used as y = x W^T (nn.Linear's layout: K is the reduction dimension)::

    quantize_int4(W, group_size=g) -> {"codes":       (N, Kp / 2) uint8,
                                       "scales":      (N, Kp / g) float16,
                                       "mins":        (N, Kp / g) float16,
                                       "in_features": ()          int64   (the true K)}
    W_hat[n, k] = code(n, k) * scales[n, k // g] + mins[n, k // g]         code in 0..15

* Groups are ``g`` consecutive K elements of one row; Kp = K rounded up to a multiple of g. The
  padded columns (k >= K) repeat the row's last true value, so they never widen a group's range;
  they are stored but no reader uses them (the matmuls multiply them by x's zero padding / mask them).
* Two codes per byte: byte j of a row holds column 2j in its low nibble, column 2j + 1 in its high one.
* The zero point is the group's minimum as a 16-bit float ("mins"), not an integer code: it costs
  the same 16 bits as the integer zero point would once stored with its scale, and is not rounded
  to the scale's grid. torch's CPU int4 kernel wants (q - 8) * scale + zero, i.e. zero = min + 8 scale
  (``ops/int4/cpu.py`` converts once).
* Scales and mins are float16 (11 significant bits; bfloat16 has 8): ``mins`` is the group minimum
  rounded down, ``scales`` (max - min) / 15 rounded up, so every true value lies on [min, min + 15 scale]
  and round-to-nearest codes keep |W - W_hat| <= scale / 2 (plus float32 rounding of the product).
  float16 bounds the weights to |W| <= 60000; larger ones are rejected.

``group_size`` must be a positive multiple of 16 (the Triton kernel's K tile divides it; torch's CPU
int4 kernel takes 32, 64, 128 and 256 -- other sizes take the chunked CPU path).

A factor pair W ~= U V^T (U: out x k, V: in x k) is two such matrices, keys prefixed::

    pack_int4_lowrank(U, V, g, u_g) -> {"v_" + key: quantize_int4(V^T, g)[key], "u_" + key: quantize_int4(U, u_g)[key]}
    y = (x V_hat) U_hat^T: stage 1 reduces over in (groups along in), stage 2 over k (groups along k).

Storage per weight: 4 bits + 2 x 16 bits per group of g (``int4_bits_per_weight``), plus 8 bytes
for ``in_features`` per matrix.
"""
from __future__ import annotations

import torch

from .._backend import check_same_device

KEYS = ("codes", "scales", "mins", "in_features")
LOWRANK_PREFIXES = ("v_", "u_")  # stage 1 (V^T, k x in), stage 2 (U, out x k)
LEVELS = 15  # codes 0..15
GROUP_MULTIPLE = 16
FP16_LIMIT = 60000.0  # below float16's 65504, so rounding the min / scale outward cannot overflow
SCALE_DTYPE = torch.float16


def int4_bits_per_weight(group_size: int = 64) -> float:
    """Storage bits per weight: the 4-bit code plus a float16 scale and a float16 min per group."""
    _check_group_size(group_size)
    return 4.0 + 2 * 16.0 / group_size


def int4_nbytes_for_shape(out_features: int, in_features: int, group_size: int = 64) -> int:
    """Bytes of quantize_int4 for an (out x in) matrix, padding and ``in_features`` included."""
    _check_group_size(group_size)
    groups = -(-in_features // group_size)
    return out_features * (groups * group_size // 2 + groups * 2 * 2) + 8


def _check_group_size(group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or group_size % GROUP_MULTIPLE:
        raise ValueError(f"group_size must be a positive multiple of {GROUP_MULTIPLE} (e.g. 64), got {group_size!r}")


def _round_outward(value: torch.Tensor, up: bool) -> torch.Tensor:
    """``value`` (float32) in float16, rounded up (or down) so that the stored number bounds it."""
    stored = value.to(SCALE_DTYPE)
    off = stored.float() < value if up else stored.float() > value
    target = torch.full_like(stored, float("inf") if up else float("-inf"))
    return torch.where(off, torch.nextafter(stored, target), stored)


def _padded_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (N, K) float32 -> (N, groups, g), the last group padded with the row's last value."""
    n, k = w.shape
    pad = -k % group_size
    if pad and k:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, w.shape[1] // group_size, group_size)


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> dict[str, torch.Tensor]:
    """Quantise w (N x K, used as x w^T) to 4-bit codes with a float16 scale and min per group of K."""
    _check_group_size(group_size)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out x in), got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():  # host sync: fine, quantisation happens once, offline
        raise ValueError("w contains NaN/Inf; int4 cannot store them -- fix the weights before quantising")
    if w32.numel() and w32.abs().max() > FP16_LIMIT:
        raise ValueError(f"w has values beyond +-{FP16_LIMIT:g}, which float16 scales cannot hold; rescale it first")
    n, k = w32.shape
    groups = _padded_groups(w32, group_size)  # (N, G, g)
    lo = _round_outward(groups.amin(dim=2), up=False)
    hi = groups.amax(dim=2)
    scale = _round_outward((hi - lo.float()) / LEVELS, up=True)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = ((groups - lo.float()[..., None]) / safe[..., None]).round_().clamp_(0, LEVELS).to(torch.uint8)
    codes = codes.reshape(n, groups.shape[1] * group_size)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"codes": packed.contiguous(), "scales": scale.contiguous(), "mins": lo.contiguous(),
            "in_features": torch.tensor(k, dtype=torch.int64, device=w.device)}


def check_int4(packed: dict, prefix: str = "", what: str = "packed") -> tuple[int, int, int]:
    """Check one matrix's keys, dtypes, shapes and device; return (out, in (shape bound), group size).

    The returned ``in`` is the padded width Kp; the true K is ``packed[prefix + "in_features"]``
    (a tensor: reading it would sync a GPU, so only the CPU paths and ``dequantize_int4`` do).
    """
    names = [prefix + key for key in KEYS]
    missing = [name for name in names if name not in packed]
    if missing:
        raise ValueError(f"{what} lacks {missing}: pass the dict from quantize_int4 / pack_int4_lowrank")
    codes, scales, mins, k = (packed[name] for name in names)
    if codes.dtype != torch.uint8 or codes.dim() != 2 or not codes.is_contiguous():
        raise TypeError(f"{what}[{names[0]!r}] must be a contiguous 2-D uint8 tensor, got {codes.dtype} "
                        f"of shape {tuple(codes.shape)}")
    for name, t in ((names[1], scales), (names[2], mins)):
        if t.dtype != SCALE_DTYPE or t.dim() != 2 or not t.is_contiguous():
            raise TypeError(f"{what}[{name!r}] must be a contiguous 2-D float16 tensor, got {t.dtype} "
                            f"of shape {tuple(t.shape)}")
    if k.dtype != torch.int64 or k.dim() != 0:
        raise TypeError(f"{what}[{names[3]!r}] must be a 0-d int64 tensor, got {k.dtype} of shape {tuple(k.shape)}")
    n, kp = codes.shape[0], 2 * codes.shape[1]
    if scales.shape != mins.shape or scales.shape[0] != n:
        raise ValueError(f"{what}: scales {tuple(scales.shape)} and mins {tuple(mins.shape)} must both be "
                         f"({n}, groups) for codes {tuple(codes.shape)}")
    groups = scales.shape[1]
    if (groups == 0) != (kp == 0) or (groups and (kp % groups or (kp // groups) % GROUP_MULTIPLE)):
        raise ValueError(f"{what}: codes {tuple(codes.shape)} and {groups} groups per row do not make "
                         f"groups of a multiple of {GROUP_MULTIPLE} columns")
    check_same_device(**{name: packed[name] for name in names})
    return n, kp, (kp // groups if groups else GROUP_MULTIPLE)


def true_in_features(packed: dict, prefix: str = "") -> int:
    """The true K of one matrix (reads a tensor: a host sync on a GPU)."""
    return int(packed[prefix + "in_features"])


def dequantize_int4(packed: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """float32 W_hat (N, K) of one matrix stored by ``quantize_int4`` (``prefix``: "v_"/"u_" of a pair)."""
    n, kp, group_size = check_int4(packed, prefix)
    codes = packed[prefix + "codes"]
    q = torch.stack([codes & 0xF, codes >> 4], dim=2).reshape(n, kp).float()
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)  # noqa: E731
    w = q * expand(packed[prefix + "scales"]) + expand(packed[prefix + "mins"])
    return w[:, :true_in_features(packed, prefix)].contiguous()


def pack_int4_lowrank(U: torch.Tensor, V: torch.Tensor, group_size: int = 64,
                      u_group_size: int | None = None) -> dict[str, torch.Tensor]:
    """Quantise W ~= U V^T (U: out x k, V: in x k): V^T (k x in) under "v_", U (out x k) under "u_".

    ``u_group_size`` (default ``group_size``) lets U take its own group size: each stage's readers
    take the group size from that stage's shapes, so the two factors may differ."""
    if not isinstance(U, torch.Tensor) or not isinstance(V, torch.Tensor) or U.dim() != 2 or V.dim() != 2 \
            or U.shape[1] != V.shape[1]:
        raise ValueError(f"need U (out x k) and V (in x k) with the same k, got "
                         f"{tuple(getattr(U, 'shape', ()))} and {tuple(getattr(V, 'shape', ()))}")
    check_same_device(U=U, V=V)
    stage1 = quantize_int4(V.T, group_size)
    stage2 = quantize_int4(U, group_size if u_group_size is None else u_group_size)
    return {**{"v_" + key: t for key, t in stage1.items()}, **{"u_" + key: t for key, t in stage2.items()}}


def unpack_int4_lowrank(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (U_hat (out x k), V_hat (in x k)) of a pair stored by ``pack_int4_lowrank``."""
    return dequantize_int4(packed, "u_"), dequantize_int4(packed, "v_").T.contiguous()


def int4_form(packed: dict) -> str:
    """'dense' (quantize_int4) or 'lowrank' (pack_int4_lowrank), from the dict's keys."""
    if not isinstance(packed, dict):
        raise TypeError(f"packed must be the dict from quantize_int4 / pack_int4_lowrank, got {type(packed).__name__}")
    keys = set(packed)
    if keys == set(KEYS):
        return "dense"
    if keys == {p + key for p in LOWRANK_PREFIXES for key in KEYS}:
        return "lowrank"
    raise ValueError(f"packed must have keys {KEYS} (quantize_int4) or those prefixed 'v_' and 'u_' "
                     f"(pack_int4_lowrank), got {sorted(keys)}")
