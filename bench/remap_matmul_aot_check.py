"""Compile the remap_matmul kernels for an H100 (sm_90) WITHOUT a GPU and report their resources.

For every bucket of configs/remap_matmul.json ("default" entry) and every tail case (V has a
tail / U has a tail / square), compile both stages ahead of time with Triton's own compiler and
ptxas, and print shared memory, registers per thread and spill bytes; also count what the PTX
uses (wgmma or mma.sync, packed e4m3 -> fp16 conversions, the acq_rel atomic of split-K).
Catches lowering failures and register spills on a CPU-only machine; says nothing about speed.

    python bench/remap_matmul_aot_check.py                  # fp16 activations, fp8 and int8 weights
    python bench/remap_matmul_aot_check.py bf16,i8 fp32,fp8e4nv
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from zskernels._configs import CONFIG_DIR  # noqa: E402

rm = importlib.import_module("zskernels.remap_matmul")
TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
STAGE1_INTS = "M IN K S stride_xm tiles_m tiles_n steps_head steps per_split n_split".split()
STAGE2_INTS = "M OUT K S tiles_m tiles_head steps per_split n_split".split()
PTX_FEATURES = ("wgmma.mma_async", "mma.sync", "cvt.rn.f16x2.e4m3x2", "atom.global.gpu.acq_rel")


def ptxas_info(ptx: str) -> tuple[str, str]:
    """(registers, spill-store bytes) from ptxas -v (the newer ptxas for newer PTX versions)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    for exe in (PTXAS, PTXAS + "-blackwell"):
        if os.path.exists(exe):
            res = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
            if res.returncode == 0:
                regs = re.search(r"Used (\d+) registers", res.stderr)
                spill = re.search(r"(\d+) bytes spill stores", res.stderr)
                return (regs.group(1) if regs else "?"), (spill.group(1) if spill else "?")
    return "?", "?"


def compile_kernel(kernel, signature: dict, constexprs: dict, options: dict):
    """Compile with 16-divisible pointers and sizes, as the launcher specialises them for LLaMA shapes."""
    names = kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in ("IN", "OUT", "K", "S", "stride_xm")}
    src = ASTSource(fn=kernel, signature={n: signature.get(n, "constexpr") for n in names},
                    constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options=options)
    ptx = compiled.asm["ptx"]
    regs, spill = ptxas_info(ptx)
    used = ",".join(f for f in PTX_FEATURES if f in ptx)
    return f"smem {compiled.metadata.shared:>6} regs {regs:>3} spill {spill:>4} [{used}]"


def check(x_dtype: str, q_dtype: str, tail_dtype: str = "fp16") -> None:
    table = json.loads((CONFIG_DIR / "remap_matmul.json").read_text())
    for bucket in table["default"]:
        cfg = dict(bucket, **(bucket.get("fp32", {}) if x_dtype == "fp32" else {}))
        blocks = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        common = dict(SPLIT_K=cfg["target_programs"] > 0, INPUT_PRECISION="ieee" if x_dtype == "fp32" else "tf32",
                      **blocks)
        for v_tail, u_tail in ((True, False), (False, True), (False, False)):
            sig1 = dict(x_ptr=f"*{x_dtype}", vq_ptr=f"*{q_dtype}", vt_ptr=f"*{tail_dtype}", sv_ptr="*fp32",
                        su_ptr="*fp32", th_ptr=f"*{x_dtype}", tt_ptr=f"*{x_dtype}", ws_ptr="*fp32", cnt_ptr="*i32",
                        **dict.fromkeys(STAGE1_INTS, "i32"))
            sig2 = dict(th_ptr=f"*{x_dtype}", tt_ptr=f"*{x_dtype}", uq_ptr=f"*{q_dtype}", ut_ptr=f"*{tail_dtype}",
                        bias_ptr="*fp16", y_ptr=f"*{x_dtype}", ws_ptr="*fp32", cnt_ptr="*i32",
                        **dict.fromkeys(STAGE2_INTS, "i32"))
            one = compile_kernel(rm._remap_stage1_kernel, sig1,
                                 dict(HAS_V_TAIL=v_tail, HAS_U_TAIL=u_tail, **common), options)
            two = compile_kernel(rm._remap_stage2_kernel, sig2, dict(HAS_U_TAIL=u_tail, HAS_BIAS=True, **common),
                                 options)
            case = "V tail" if v_tail else "U tail" if u_tail else "square"
            head = f"x {x_dtype:<4} w {q_dtype:<7} max_m {bucket['max_m']:>7} {case:<6}"
            print(f"{head} | stage 1: {one} | stage 2: {two}")


def main() -> None:
    rm._register_triton_op()  # turns the kernel functions into triton.jit functions
    print(f"triton {triton.__version__}, target sm_90")
    for spec in sys.argv[1:] or ("fp16,fp8e4nv", "fp16,i8"):
        check(*spec.split(","))


if __name__ == "__main__":
    main()
