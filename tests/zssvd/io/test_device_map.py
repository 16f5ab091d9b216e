"""Checkpoints across devices: ``zssvd.load(DIR, device_map=...)`` and ``from_pretrained(DIR, device_map=...)``
give the logits of a one-device load.

This machine has one device (the CPU), so the maps split a model between "cpu" (resident) and "disk"
(accelerate's offload hooks read the tensors from the checkpoint for each forward and drop them after). Every
computation runs on the CPU with the same kernels on the same values, so the logits must be bit-identical
(``torch.equal``), over two forward calls: the second one runs on tensors the hooks loaded anew, which the
CPU kernels' derived-tensor cache (keyed on the tensor objects) must not confuse with the first ones.
"""
import sys

import pytest
import torch

import zssvd
from checkpoint_helpers import compress_tiny, hf_from_pretrained, logits
from zssvd.io.models import find_blocks
from zssvd.nn import packed_modules

FAMILIES = ("llama", "opt")  # opt: tied embeddings, biases, learned positions, other module names
LOADERS = {"zssvd.load": zssvd.load, "from_pretrained": hf_from_pretrained}
_SAVED = {}


@pytest.fixture(params=FAMILIES)
def arch(request):
    return request.param


@pytest.fixture
def checkpoint(arch, storage, tmp_path_factory):
    """A saved tiny compressed checkpoint of (arch, storage), written once per session."""
    if (arch, storage) not in _SAVED:
        model, report = compress_tiny(arch, storage)
        _SAVED[arch, storage] = zssvd.save_compressed(model, tmp_path_factory.mktemp(f"{arch}-{storage}"),
                                                      report=report)
    return _SAVED[arch, storage]


def split_map(model) -> dict:
    """{module: device} with the first half of the decoder blocks on "cpu", the rest and the output head on
    "disk", every other module holding weights on "cpu"."""
    path, blocks = find_blocks(model)
    device_map = {f"{path}.{i}": "cpu" if i < len(blocks) // 2 else "disk" for i in range(len(blocks))}
    for name, module in model.named_modules():
        if name.startswith(path) or not name:
            continue
        own = [*module._parameters, *(b for b in module._buffers if b not in module._non_persistent_buffers_set)]
        if own and not any(name.startswith(f"{known}.") for known in device_map):
            device_map[name] = "disk" if name == "lm_head" else "cpu"
    return device_map


def tensor_bytes(model) -> int:
    """What accelerate plans with: every parameter and buffer (tied ones once) at its dtype's size."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def offloaded(model, device_map: dict) -> dict[str, bool]:
    """For each packed module: whether its buffers are all on the meta device (left there by the hooks)."""
    from zssvd.io.placement import device_of

    return {name: all(t.is_meta for t in m.packed().values()) for name, m in packed_modules(model).items()
            if device_of(device_map, name) == "disk"}


def assert_same_logits_twice(model, expected, ids):
    for _ in range(2):
        assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_cpu_and_disk_map_gives_the_one_device_logits(name, checkpoint, ids):
    reference = zssvd.load(checkpoint)
    expected = logits(reference, ids)
    device_map = split_map(reference)
    assert set(device_map.values()) == {"cpu", "disk"}
    model = LOADERS[name](checkpoint, device_map=device_map)
    disk = offloaded(model, device_map)
    assert disk and all(disk.values())  # packed buffers offloaded, not kept resident
    assert_same_logits_twice(model, expected, ids)
    assert all(offloaded(model, device_map).values())  # dropped again after each forward
    resident = [m for n, m in packed_modules(model).items() if n not in disk]
    assert resident and all(t.device.type == "cpu" for m in resident for t in m.packed().values())


@pytest.mark.parametrize("name", list(LOADERS))
def test_auto_with_too_little_memory_splits_between_cpu_and_disk(name, checkpoint, ids):
    reference = zssvd.load(checkpoint)
    expected = logits(reference, ids)
    model = LOADERS[name](checkpoint, device_map="auto", max_memory={"cpu": tensor_bytes(reference) * 9 // 10})
    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    assert_same_logits_twice(model, expected, ids)


def test_auto_with_room_for_everything_keeps_one_device(checkpoint, ids):
    expected = logits(zssvd.load(checkpoint), ids)
    for name, load in LOADERS.items():
        model = load(checkpoint, device_map="auto")
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "cpu" for t in tensors), name  # none offloaded (meta)
        assert torch.equal(logits(model, ids), expected), name


@pytest.mark.parametrize("name", list(LOADERS))
def test_the_plan_counts_packed_bytes_not_dense_ones(name, arch, tmp_path):
    model, report = compress_tiny(arch, "hq")
    zssvd.save_compressed(model, tmp_path, report=report)
    reference = zssvd.load(tmp_path)
    packed = tensor_bytes(reference)
    dense = packed + sum(2 * m.in_features * m.out_features - m.nbytes() for m in packed_modules(reference).values())
    assert dense > packed * 1.2  # a plan from dense sizes could not fit in `packed` bytes
    fits = LOADERS[name](tmp_path, device_map="sequential", max_memory={"cpu": packed})
    assert not any(t.is_meta for t in [*fits.parameters(), *fits.buffers()])  # nothing offloaded
    short = LOADERS[name](tmp_path, device_map="sequential", max_memory={"cpu": packed - 1})
    assert "disk" in set(short.hf_device_map.values())


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_compute_dtype_with_a_device_map(name, arch, tmp_path, ids):
    model, report = compress_tiny(arch, "dense")  # float factors: re-typed to the compute dtype
    zssvd.save_compressed(model, tmp_path, report=report)
    reference = zssvd.load(tmp_path, dtype=torch.float32)
    placed = LOADERS[name](tmp_path, device_map=split_map(reference), dtype=torch.float32)
    assert_same_logits_twice(placed, logits(reference, ids), ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", list(LOADERS))
@pytest.mark.parametrize("device_map", ["cuda:0", {"": 0}, {"": "cuda"}])
def test_a_gpu_map_without_cuda_is_one_line_error(name, device_map, tmp_path):
    model, report = compress_tiny("llama", "hq")
    zssvd.save_compressed(model, tmp_path, report=report)
    with pytest.raises(ValueError, match="no cuda device") as err:
        LOADERS[name](tmp_path, device_map=device_map)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_map_that_splits_a_packed_module_is_refused(name, tmp_path):
    model, report = compress_tiny("llama", "remap")
    zssvd.save_compressed(model, tmp_path, report=report)
    packed = next(iter(packed_modules(model)))
    buffer = next(iter(packed_modules(model)[packed].packed()))
    with pytest.raises(ValueError, match=f"splits the packed module {packed}"):
        LOADERS[name](tmp_path, device_map={"": "cpu", f"{packed}.{buffer}": "disk"})


def test_device_and_device_map_together_are_refused(tmp_path):
    model, report = compress_tiny("llama", "hq")
    zssvd.save_compressed(model, tmp_path, report=report)
    with pytest.raises(ValueError, match="not both"):
        zssvd.load(tmp_path, device="cpu", device_map="auto")


def test_without_accelerate_the_error_names_the_install(monkeypatch):
    from zssvd.io import placement

    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` raises ImportError
    with pytest.raises(ImportError, match="pip install accelerate"):
        placement.require_accelerate()


@pytest.mark.parametrize("name", list(LOADERS))
def test_format_1_checkpoints_load_across_devices_too(name, tmp_path, ids):
    from checkpoint_helpers import save_v1

    model, _ = compress_tiny("llama", "remap")
    save_v1(model, tmp_path)
    reference = zssvd.load(tmp_path)
    placed = LOADERS[name](tmp_path, device_map=split_map(reference))
    assert_same_logits_twice(placed, logits(reference, ids), ids)
