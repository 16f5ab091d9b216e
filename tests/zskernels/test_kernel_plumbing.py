"""The shared plumbing of zskernels: torch.library registration (opcheck), import without triton,
and the config loader with the tuning script that writes it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zskernels as zk
from zskernels import _configs, _device, _triton
from zskernels._backend import triton_available
from zskernels.formats.remap import PACKED_KEYS

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available() or (DEVICE == "cpu" and not _device.interpreting()),
                                  reason="needs triton (and TRITON_INTERPRET=1 without a GPU)")


# ----------------------------------------------------------------------------------------------
# opcheck on every registered op
# ----------------------------------------------------------------------------------------------
def _op_cases():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    U, H, V = r(37, 13), r(37, 29), r(29, 13)
    x = r(3, 23)
    remap = {k: t.to(DEVICE) for k, t in zk.pack_remap(r(37, 9).cpu(), r(23, 9).cpu()).items()}
    low = {k: t.to(DEVICE) for k, t in zk.pack_fp8_lowrank(r(37, 9).cpu(), r(23, 9).cpu()).items()}
    dense = {k: t.to(DEVICE) for k, t in zk.quantize_fp8_dense(r(37, 23).cpu()).items()}
    i4 = {k: t.to(DEVICE) for k, t in zk.quantize_int4(r(37, 23).cpu(), 16).items()}
    i4low = {k: t.to(DEVICE) for k, t in zk.pack_int4_lowrank(r(37, 9).cpu(), r(23, 9).cpu(), 16).items()}
    # (op, its module (to register it), arguments, whether it is a triton_op)
    return {
        "sigma_scores": ("zskernels.ops.scores.kernels", (U, H, V, 3), True),
        "sigma_scores_batched": ("zskernels.ops.scores.kernels", ([U, U[:5]], [H, H[:5]], [V, V], 3), False),
        "remap_matmul": ("zskernels.ops.remap.kernels", (x, *(remap[k] for k in PACKED_KEYS), r(37)), True),
        "fp8_linear": ("zskernels.ops.fp8.kernels", (x, dense["weight_fp8"], dense["weight_scale"], r(37)), True),
        "fp8_lowrank_matmul": ("zskernels.ops.fp8.kernels",
                               (x, low["u_fp8"], low["u_scale"], low["vt_fp8"], low["v_scale"], None), True),
        "int4_linear": ("zskernels.ops.int4.kernels", (x, i4["codes"], i4["scales"], i4["mins"], r(37)), True),
        "int4_lowrank_matmul": ("zskernels.ops.int4.kernels", (x, *(i4low[p + k] for p in ("v_", "u_") for k in
                                                                    ("codes", "scales", "mins")), None), True),
    }


OPS = list(_op_cases())


def _test_utils(name: str, is_triton_op: bool) -> tuple:
    if DEVICE == "cuda":
        return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    utils = ["test_autograd_registration", "test_faketensor"]
    # test_schema reruns the op and compares inputs with arithmetic that CPU torch lacks for float8.
    if not name.startswith("fp8"):
        utils.append("test_schema")
    # test_aot_dispatch_*: in the interpreter a triton_op's launches cannot be traced (wrap_triton
    # refuses interpreted kernels, so _triton.launch skips them under tracing); the GPU runs it.
    if not is_triton_op:
        utils.append("test_aot_dispatch_dynamic")
    return tuple(utils)


@needs_triton
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    module, args, is_triton_op = _op_cases()[name]
    _triton.ready(module)
    op = getattr(torch.ops.zskernels, name).default
    torch.library.opcheck(op, args, test_utils=_test_utils(name, is_triton_op))


def test_every_op_module_declares_its_ops():
    declared = {op.name for ops in _triton._PENDING.values() for op in ops}
    assert declared == {f"zskernels::{name}" for name in OPS}


# ----------------------------------------------------------------------------------------------
# Import without triton
# ----------------------------------------------------------------------------------------------
def test_import_and_torch_backend_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, zskernels\n"
        "U, H, V = torch.randn(6, 2), torch.randn(6, 5), torch.randn(5, 2)\n"
        "s = zskernels.sigma_scores(U, H, V, backend='torch')\n"
        "assert torch.allclose(s, (U * (H @ V)).sum(0), atol=1e-5)\n"
        "p = zskernels.pack_remap(torch.randn(8, 3), torch.randn(6, 3))\n"
        "assert zskernels.remap_matmul(torch.randn(2, 6), p).shape == (2, 8)\n"
        "q = zskernels.pack_fp8_lowrank(torch.randn(8, 3), torch.randn(6, 3))\n"
        "assert zskernels.fp8_lowrank_matmul(torch.randn(2, 6), q).shape == (2, 8)\n"
        "assert sys.modules['triton'] is None\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_public_names_are_functions_not_modules():
    """No module shadows a public function of the same name (zskernels.remap_matmul is the op)."""
    for name in zk.__all__:
        value = getattr(zk, name)
        if name != "formats":
            assert not isinstance(value, type(zk)), name


# ----------------------------------------------------------------------------------------------
# Config loader and tuning writer
# ----------------------------------------------------------------------------------------------
def test_use_config_forces_and_restores():
    cpu = torch.device("cpu")
    before = _configs.pick_config("remap_matmul", 3, cpu)
    with _configs.use_config("remap_matmul", {"BLOCK_M": 99}):
        assert _configs.pick_config("remap_matmul", 3, cpu) == {"BLOCK_M": 99}
    assert _configs.pick_config("remap_matmul", 3, cpu) == before


@pytest.fixture
def tune_configs():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tune_configs
        yield tune_configs
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_tuned_configs_round_trip(tmp_path, monkeypatch, tune_configs):
    """Fake timings -> write_tuned -> the loader picks the fastest config for that GPU."""
    config_dir = tmp_path / "configs"
    shutil.copytree(ROOT / "zskernels" / "configs", config_dir)
    gpu = "NVIDIA Test GPU"
    default = _configs.table("remap_matmul", config_dir)["default"]
    records = []
    for bucket in default:
        for i, cfg in enumerate(tune_configs.candidates(bucket)[:3]):
            records.append({"op": "remap_matmul", "gpu": gpu, "max_m": bucket["max_m"], "size": 1,
                            "config": cfg, "us": 10.0 - i})  # the third candidate is fastest
    dump = tmp_path / "timings.jsonl"
    dump.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    assert tune_configs.main(["--from-dump", str(dump), "--config-dir", str(config_dir)]) == 0

    written = json.loads((config_dir / "remap_matmul.json").read_text())
    assert written["default"] == default and "_comment" in written  # other entries kept
    monkeypatch.setattr(_device, "device_name", lambda device: gpu)
    for bucket in default:
        want = tune_configs.candidates(bucket)[2]
        assert _configs.pick_config("remap_matmul", bucket["max_m"], torch.device("cpu"), config_dir) == want
    monkeypatch.setattr(_device, "device_name", lambda device: "another GPU")
    assert _configs.pick_config("remap_matmul", 1, torch.device("cpu"), config_dir) == {
        k: v for k, v in default[0].items() if k != "max_m"}
    with pytest.raises(ValueError, match="GPU name"):
        _configs.write_buckets("remap_matmul", "default", [], config_dir)


def test_remap_register_cap_reaches_the_launch_only_where_a_config_sets_one():
    from zskernels import _configs
    from zskernels.ops.remap.kernels import _kernel_options

    wide = [b for b in _configs.table("remap_matmul")["default"] if b["BLOCK_M"] == 128 and b["BLOCK_N"] == 128]
    assert wide and all(b["maxnreg"] == 128 and b["fp32"]["maxnreg"] == 0 for b in wide)
    bucket = {k: v for k, v in wide[-1].items() if k != "fp32"}
    assert _kernel_options(bucket, torch.zeros(1, dtype=torch.float16))["maxnreg"] == 128
    fp32 = {**bucket, **wide[-1]["fp32"]}
    assert "maxnreg" not in _kernel_options(fp32, torch.zeros(1))  # 0: no cap
