"""sigma_scores in plain torch: argument checks shared with the kernel path, and the reference
(the CPU fallback, and the only path for float64)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..._backend import check_same_device, resolve_backend

Tensor = torch.Tensor

# tl.dot input precisions for fp32 operands, passed to the kernel as small ints (constexprs).
PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16x3": 3}
DEFAULT_PRECISION = "bf16x3"

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def check_triple(U: Tensor, H: Tensor, V: Tensor, where: str) -> None:
    """Shapes and dtypes of one (U, H, V) triple; ``where`` prefixes every message."""
    for name, t in (("U", U), ("H", H), ("V", V)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _TORCH_DTYPES:
            raise TypeError(
                f"{where}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16 "
                "(float64 only with backend='torch')"
            )
    (m, k), (mh, n), (nv, kv) = U.shape, H.shape, V.shape
    if m != mh:
        raise ValueError(f"{where}: U has {m} rows but H has {mh}; U (m x k) and H (m x n) must share m")
    if n != nv:
        raise ValueError(f"{where}: H has {n} columns but V has {nv} rows; V must be n x k for H of m x n")
    if k != kv:
        raise ValueError(f"{where}: U has {k} columns but V has {kv}; both must hold the same k components")


def check_precision(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def choose_backend(backend: str, tensors: Sequence[Tensor], where: str) -> str:
    """resolve_backend, plus: float64 goes to torch under "auto" and is refused by Triton."""
    has_f64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto" and has_f64:
        return "torch"
    chosen = resolve_backend(backend, *tensors)
    if chosen == "triton" and has_f64:
        raise TypeError(
            f"{where}: backend='triton' does not take float64 inputs; cast them to float32 "
            "or use backend='torch'"
        )
    return chosen


def split_items(items: list[tuple]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Check the batched triples (shapes, one device, one dtype per role); return U, H, V lists."""
    for i, item in enumerate(items):
        if len(item) != 3:
            raise ValueError(f"sigma_scores_batched: item {i} must be a (U, H, V) triple, got {len(item)} entries")
        check_triple(*item, f"sigma_scores_batched: item {i}")
    us, hs, vs = ([item[j] for item in items] for j in range(3))
    if items:
        check_same_device(**{f"{role}{i}": t for role, ts in zip("UHV", (us, hs, vs)) for i, t in enumerate(ts)})
        for role, ts in zip("UHV", (us, hs, vs)):
            dtypes = sorted({str(t.dtype) for t in ts})
            if len(dtypes) > 1:
                raise TypeError(
                    f"sigma_scores_batched: every {role} must share one dtype, got {', '.join(dtypes)}; "
                    "cast them, or score the groups in separate calls"
                )
    return us, hs, vs


def sigma_scores_reference(U: Tensor, H: Tensor, V: Tensor, *, chunk: int = 1024) -> Tensor:
    """s_i = u_i^T H v_i in plain torch: fp32 math (float64 if any input is float64).

    Works on chunk x chunk blocks of H @ V, so no m x k (or upcast n x k) intermediate is
    ever held. On CUDA, fp32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
    """
    check_triple(U, H, V, "sigma_scores_reference")
    check_same_device(U=U, H=H, V=V)
    acc = torch.float64 if torch.float64 in (U.dtype, H.dtype, V.dtype) else torch.float32
    m, k = U.shape
    s = torch.zeros(k, dtype=acc, device=U.device)
    for c0 in range(0, k, chunk):
        c1 = min(c0 + chunk, k)
        v = V[:, c0:c1].to(acc)
        for r0 in range(0, m, chunk):
            r1 = min(r0 + chunk, m)
            hv = H[r0:r1].to(acc) @ v
            s[c0:c1] += (U[r0:r1, c0:c1].to(acc) * hv).sum(0)
    return s
