"""Compile every Triton kernel for a GPU without one, with the arguments its launcher would pass.

    python bench/aot_check.py               # H100 (sm_90): every op, LLaMA-7B shapes, M = 1 ... 2048
    python bench/aot_check.py --arch 80     # A100 (sm_80): the fp8 ops take their byte-decoding path
    python bench/aot_check.py --quick       # fp16 activations, M = 1 and 2048 only (what the tests run)
    python bench/aot_check.py --only int4   # compile only the kernels whose name contains "int4"

1. Record. With TRITON_INTERPRET=1, each op runs at LLaMA-7B shapes and the benchmarks' token
   counts, but every kernel launch is intercepted and nothing executes. The launchers' questions
   about the device (GPU name, SM count, native fp8, bf16 dot) are answered as the target GPU
   would answer them. Each launch is kept as Triton's JIT would specialise it: argument types,
   16-divisibility, constexprs, num_warps and num_stages.
2. Compile. Each distinct launch is compiled for the target with Triton's compiler and ptxas. The
   table gives shared memory against the GPU's limit, registers, spills and the PTX features used.
3. Census. The cubin of each launch is disassembled (Triton's own cuobjdump): static counts of
   128-bit and narrower global loads (LDG, cp.async LDGSTS, TMA), 128-bit stores, warpgroup
   (wgmma) and mma.sync tensor-core instructions, local-memory spills; registers and shared memory
   give the blocks per SM and the limit that sets them. A markdown table and the targets follow:
   tensor cores wherever tl.dot runs on 16-bit or TF32 operands, no spills.

This catches lowering failures, shared-memory overflows and spills on a CPU-only machine, with
whatever Triton is installed (the lent H100 has 3.6). It says nothing about speed. Exit status 1
when a kernel fails to compile or needs more shared memory than the GPU has.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

# Recording runs the launchers in the interpreter; compiling needs a Triton imported without it
# (the interpreter turns even triton.language's own helpers into interpreted functions).
RECORDING = "--record" in sys.argv
if RECORDING:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import zskernels  # noqa: E402
from zskernels import _triton  # noqa: E402
from zskernels.formats.remap import FORMATS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpus import BY_ARCH as GPUS, GPU, answering_as, occupancy  # noqa: E402

# (out, in): LLaMA-7B's q/k/v/o, gate/up and down, and a GQA k/v projection (Mistral-7B, LLaMA-3-8B),
# whose narrow output makes the fp8 decode path split K and reduce.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096))
TOKENS = (1, 4, 16, 64, 256, 2048)


PTX_FEATURES = ("wgmma.mma_async", "mma.sync", "cvt.rn.f16x2.e4m3x2", "atom.global.gpu.acq_rel")


# ----------------------------------------------------------------------------------------------
# 1. Record (child process, interpreter)
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str  # "module:function"
    signature: dict  # parameter name -> Triton type; "constexpr" for specialised ones
    constexprs: dict
    divisible: tuple  # parameters specialised as multiples of 16
    options: dict  # num_warps, num_stages
    cases: list = field(default_factory=list)  # the op calls that launched it

    def key(self) -> tuple:
        return (self.kernel, tuple(self.signature.items()), tuple(sorted(map(str, self.constexprs.items()))),
                self.divisible, tuple(sorted(self.options.items())))


def specialise(fn: Callable, args: tuple, kwargs: dict) -> Launch:
    """A launch of the kernel whose Python function is ``fn``, as the JIT specialises it."""
    params = inspect.signature(fn).parameters
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, divisible = {}, {}, []
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation):
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)  # Triton's own rule
        signature[name] = kind
        if kind == "constexpr":  # ints equal to 1, and None
            constexprs[name] = value
        elif spec == "D":
            divisible.append(name)
    return Launch(f"{fn.__module__}:{fn.__name__}", signature, constexprs, tuple(divisible), options)


class Recorder:
    """Intercepts interpreter launches (nothing runs) and answers device questions as ``gpu`` would."""

    def __init__(self, gpu: GPU):
        self.gpu = gpu
        self.launches: dict[tuple, Launch] = {}
        self.case = ""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        def run(kernel, *args, grid, warmup, **kwargs):
            launch = specialise(kernel.fn, args, kwargs)
            self.launches.setdefault(launch.key(), launch).cases.append(self.case)

        self._answers = answering_as(self.gpu)  # every device question
        self._answers.__enter__()
        self._saved_run = InterpretedFunction.run
        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._saved_run
        self._answers.__exit__(*exc)

    def call(self, case: str, op: Callable, *args, **kwargs) -> None:
        self.case = case
        op(*args, **kwargs)


def record_all(gpu: GPU, x_dtypes: tuple, tokens: tuple) -> list[Launch]:
    """Every op at LLaMA-7B shapes: scores in fp32 and ``x_dtypes``; the matmuls at each token count."""
    gen = torch.Generator().manual_seed(0)
    with Recorder(gpu) as rec:
        for dtype in (torch.float32,) + x_dtypes:
            name = str(dtype).removeprefix("torch.")
            triples = [(torch.empty(out, min(out, in_), dtype=dtype), torch.empty(out, in_, dtype=dtype),
                        torch.empty(in_, min(out, in_), dtype=dtype)) for out, in_ in SHAPES]
            for triple in triples:
                rec.call(f"sigma_scores {name} {tuple(triple[1].shape)}", zskernels.sigma_scores, *triple,
                         backend="triton")
            rec.call(f"sigma_scores_batched {name}", zskernels.sigma_scores_batched, triples, backend="triton")
        for out, in_ in SHAPES:
            remap_rank = round(0.6 * min(out, in_) / 16) * 16  # rho 0.6, as bench_remap_matmul.py
            hq_rank = int(0.8 * out * in_ / (out + in_)) // 16 * 16  # storage 0.4, as bench_fp8_matmul.py
            stores = {f"remap-{fmt}": (zskernels.remap_matmul, zskernels.pack_remap(
                          torch.randn(out, remap_rank, generator=gen), torch.randn(in_, remap_rank, generator=gen),
                          fmt=fmt)) for fmt in FORMATS}
            stores["fp8-lowrank"] = (zskernels.fp8_lowrank_matmul, zskernels.pack_fp8_lowrank(
                torch.randn(out, hq_rank, generator=gen), torch.randn(in_, hq_rank, generator=gen)))
            dense = torch.randn(out, in_, generator=gen)
            stores["fp8-dense"] = (zskernels.fp8_linear, zskernels.quantize_fp8_dense(dense))
            stores["int4-dense"] = (zskernels.int4_linear, zskernels.quantize_int4(dense, 64))
            stores["int4-lowrank"] = (zskernels.int4_lowrank_matmul, zskernels.pack_int4_lowrank(
                torch.randn(out, hq_rank, generator=gen), torch.randn(in_, hq_rank, generator=gen), 64))
            # --group-size auto: each stage its own group, so its own K tile (32 under V's groups of 32)
            stores["int4-lowrank-g32u256"] = (zskernels.int4_lowrank_matmul, zskernels.pack_int4_lowrank(
                torch.randn(out, hq_rank, generator=gen), torch.randn(in_, hq_rank, generator=gen), 32, 256))
            for dtype, m, (storage, (op, packed)) in itertools.product(x_dtypes, tokens, stores.items()):
                x = torch.randn(m, in_, generator=gen).to(dtype)
                for bias in (None, torch.zeros(out, dtype=dtype)) if m == 1 else (None,):
                    case = f"{storage} x {str(dtype)[6:]} {out}x{in_} M={m}{' +bias' if bias is not None else ''}"
                    rec.call(case, op, x, packed, bias, backend="triton")
    return list(rec.launches.values())


# ----------------------------------------------------------------------------------------------
# 2. Compile (this process, no interpreter)
# ----------------------------------------------------------------------------------------------
def jit_function(kernel: str):
    """The triton.jit function named "module:function" (its module registered, as a first call would)."""
    module_name, name = kernel.split(":")
    module = importlib.import_module(module_name)
    _triton.ready(module_name)  # every op module's one "jit and register" step
    return getattr(module, name)


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump (Triton's own copy) on one compiled kernel: "-sass" or "-res-usage"."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_nvidia_tool("cuobjdump"), flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


# SASS opcode classes the census counts (static instructions in the binary, not executed ones).
SASS_CLASSES = {
    "LDG.128": lambda op: op.startswith("LDG") and op.endswith(".128"),  # 16-byte global loads to registers
    "LDG<128": lambda op: op.startswith("LDG.") and not op.endswith(".128") and not op.startswith("LDGSTS"),
    "LDGSTS.128": lambda op: op.startswith("LDGSTS") and op.endswith(".128"),  # cp.async, 16 bytes
    "LDGSTS<128": lambda op: op.startswith("LDGSTS") and not op.endswith(".128"),
    "TMA": lambda op: op.startswith("UTMALDG"),
    "STG.128": lambda op: op.startswith("STG") and op.endswith(".128"),
    "STG<128": lambda op: op.startswith("STG") and not op.endswith(".128"),
    "wgmma": lambda op: op.split(".")[0] in ("HGMMA", "QGMMA", "IGMMA"),  # sm_90 warpgroup MMA
    "mma": lambda op: op.split(".")[0] in ("HMMA", "IMMA", "QMMA"),  # mma.sync
    "spill": lambda op: op.split(".")[0] in ("LDL", "STL"),
}
SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_census(sass: str) -> dict[str, int]:
    """Static count of each SASS_CLASSES class in a kernel's disassembly."""
    counts = dict.fromkeys(SASS_CLASSES, 0)
    for op in SASS_OPCODE.findall(sass):
        for name, test in SASS_CLASSES.items():
            counts[name] += test(op)
    return counts


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local-memory spill bytes, stack-frame bytes) per thread of the compiled kernel."""
    usage = _cuobjdump(cubin, "-res-usage")
    found = [re.search(rf"{key}:(\d+)", usage) for key in ("REG", "LOCAL", "STACK")]
    return tuple(int(f.group(1)) if f else -1 for f in found)


@dataclass
class Compiled:
    fits: bool
    smem: int
    regs: int
    local: int
    stack: int  # bytes of stack frame: values ptxas keeps in local memory across a loop (LDL/STL)
    features: str
    census: dict
    blocks_per_sm: int
    occupancy_limit: str

    def line(self, gpu: GPU, num_warps: int) -> str:
        sass = " ".join(f"{k} {v}" for k, v in self.census.items())
        return (f"smem {self.smem:>6}{'' if self.fits else ' > ' + str(gpu.smem_limit)} regs {self.regs:>3} "
                f"spill {self.local:>4} stack {self.stack:>3} [{self.features}]\n"
                f"    sass: {sass}; {self.blocks_per_sm} blocks/SM "
                f"({self.blocks_per_sm * num_warps}/64 warps, {self.occupancy_limit}-bound)")


def compile_launch(launch: Launch, gpu: GPU) -> Compiled:
    """Compile one launch for ``gpu``; raises what Triton's compiler raises."""
    fn = jit_function(launch.kernel)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.divisible}
    src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", gpu.arch, 32), options=launch.options)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    regs, local, stack = resource_usage(cubin)
    smem = compiled.metadata.shared
    blocks, limit = occupancy(gpu.arch, regs, smem, launch.options.get("num_warps", 4))
    features = ",".join(f for f in PTX_FEATURES if f in ptx) or "-"
    return Compiled(smem <= gpu.smem_limit, smem, regs, local, stack, features,
                    sass_census(_cuobjdump(cubin, "-sass")), blocks, limit)


def describe(launch: Launch) -> str:
    """Kernel, options and the constexprs that pick code (flags that are on, block sizes)."""
    shown = {k: v for k, v in launch.constexprs.items() if v is True or (v is not None and not isinstance(v, bool))}
    options = " ".join(f"{k}={v}" for k, v in launch.options.items())
    return f"{launch.kernel.split(':')[1]} {options} {shown}"


def record_in_child(args: argparse.Namespace) -> list[Launch]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pkl")
        cmd = [sys.executable, __file__, "--record", path, "--arch", str(args.arch)]
        cmd += ["--quick"] if args.quick else []
        subprocess.run(cmd, check=True)
        with open(path, "rb") as f:
            return pickle.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(GPUS), default=90)
    parser.add_argument("--quick", action="store_true", help="fp16 activations, M = 1 and 2048 only")
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="compile only the kernels whose name contains TEXT (e.g. int4, fp8, remap)")
    parser.add_argument("--record", metavar="PATH", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    gpu = GPUS[args.arch]
    if args.record:
        x_dtypes = (torch.float16,) if args.quick else (torch.float16, torch.bfloat16)
        with open(args.record, "wb") as f:
            pickle.dump(record_all(gpu, x_dtypes, (1, 2048) if args.quick else TOKENS), f)
        return 0
    launches = [la for la in record_in_child(args) if args.only in la.kernel]
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{gpu.arch} ({gpu.name}): "
          f"{len(launches)} distinct launches")
    failures, results = 0, []
    for launch in sorted(launches, key=lambda la: la.kernel):
        try:
            result = compile_launch(launch, gpu)
            fits, report = result.fits, result.line(gpu, launch.options.get("num_warps", 4))
            results.append((launch, result))
        except Exception as err:  # noqa: BLE001 -- every compile error is a finding to report
            fits, report = False, f"FAILED: {type(err).__name__}: {err}"
        failures += not fits
        print(f"{describe(launch)}\n    {report}    e.g. {launch.cases[0]} ({len(launch.cases)} calls)", flush=True)
    print(f"{failures} of {len(launches)} launches fail to compile or overflow shared memory")
    print("\n" + census_report(results, gpu))
    return 1 if failures else 0


def wants_tensor_cores(launch: Launch) -> bool:
    """Whether the launch's path multiplies with tl.dot on 16-bit or TF32/bf16-split operands."""
    c = launch.constexprs
    if launch.kernel.endswith(("_remap_stage1_kernel", "_remap_stage2_kernel")):
        return c.get("INPUT_PRECISION") != "ieee"
    if launch.kernel.endswith((":_matmul_kernel", ":_int4_matmul_kernel")):
        return bool(c.get("USE_DOT")) and c.get("CDT") != 2
    if launch.kernel.endswith(("_score_kernel", "_batched_score_kernel")) and "reduce" not in launch.kernel:
        return not (c.get("UPCAST") and c.get("PRECISION") == 0)
    return False


def census_report(results: list, gpu: GPU) -> str:
    """Markdown table of the SASS census, then the targets: tensor cores where tl.dot runs, no spills."""
    head = ("| kernel | config | e.g. | regs | spill/stack B | smem KiB | blocks/SM (warps) | LDG.128 | LDG<128 | "
            "LDGSTS.128 | LDGSTS<128 | wgmma | mma.sync | tensor cores |")
    lines = [head, "|" + "---|" * 14]
    no_tc, spills, stacks, narrow = [], [], [], []
    for launch, r in results:
        warps = launch.options.get("num_warps", 4)
        c = r.census
        want = wants_tensor_cores(launch)
        tc = c["wgmma"] + c["mma"] > 0
        verdict = ("wgmma" if c["wgmma"] else "mma.sync" if tc else "MISSING") if want else "n/a (no tl.dot)"
        name = launch.kernel.split(":")[1]
        if want and not tc:
            no_tc.append(f"{name} {launch.cases[0]}")
        if r.local > 0:
            spills.append(f"{name} {launch.cases[0]} ({r.local} B/thread)")
        elif c["spill"]:
            stacks.append(f"{name} {launch.cases[0]} ({r.stack} B stack/thread, {c['spill']} LDL/STL)")
        if c["LDG<128"] + c["LDGSTS<128"]:
            narrow.append(name)
        blocks = {k: v for k, v in launch.constexprs.items() if k.startswith(("BLOCK_", "B")) and isinstance(v, int)}
        config = "x".join(str(v) for v in blocks.values()) + f" w{warps} s{launch.options.get('num_stages', '?')}"
        lines.append(f"| {name} | {config} | {launch.cases[0]} | {r.regs} | {r.local}/{r.stack} | "
                     f"{r.smem / 1024:.1f} | {r.blocks_per_sm} ({r.blocks_per_sm * warps}/64, {r.occupancy_limit}) | "
                     f"{c['LDG.128']} | {c['LDG<128']} | {c['LDGSTS.128']} | {c['LDGSTS<128']} | {c['wgmma']} | "
                     f"{c['mma']} | {verdict} |")
    lines += ["", f"Census of {len(results)} launches for sm_{gpu.arch} (static SASS instructions, cuobjdump):",
              f"- tensor cores missing where tl.dot runs on 16-bit/TF32 operands: {len(no_tc)}"
              + "".join(f"\n  - {x}" for x in no_tc),
              f"- launches with register spills (LOCAL > 0): {len(spills)}" + "".join(f"\n  - {x}" for x in spills),
              f"- launches with a stack frame instead (values kept in local memory, LDL/STL): {len(stacks)}"
              + "".join(f"\n  - {x}" for x in stacks),
              f"- launches with some global loads narrower than 128 bits (masked edges, scalars, scales): "
              f"{len(narrow)} ({', '.join(sorted(set(narrow)))})"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
