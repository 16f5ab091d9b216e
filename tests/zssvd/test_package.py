"""The package's shape: a lean ``import zssvd``, modules that import alone, no import cycles."""
import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "python" / "zssvd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in SOURCE.rglob("*.py"))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=SOURCE.parents[1])


def test_import_zssvd_has_no_side_effects_and_pulls_in_no_extras():
    code = """
import json, sys
import zssvd
from transformers import AutoConfig
heavy = [m for m in ("triton", "vllm", "lm_eval", "matplotlib", "zskernels") if m in sys.modules]
try:
    AutoConfig.for_model("zssvd")
    registered = True
except ValueError:
    registered = False
print(json.dumps({"heavy": heavy, "registered": registered}))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"heavy": [], "registered": False}


def test_register_hf_is_explicit():
    run = _run("import zssvd; from transformers import AutoConfig; zssvd.register_hf(); zssvd.register_hf(); "
               "print(type(AutoConfig.for_model('zssvd')).__name__)")
    assert run.returncode == 0 and run.stdout.strip() == "ZSSVDConfig", run.stderr


# The vLLM plugin's modules subclass vLLM's classes, so they need the optional extra to import.
NEEDS_VLLM = {"zssvd.io.vllm.config", "zssvd.io.vllm.linear"}


def _vllm_installed() -> bool:
    try:  # tests/ holds a folder named vllm: look for a module only the real package has
        return importlib.util.find_spec("vllm.model_executor") is not None
    except ImportError:
        return False


@pytest.mark.parametrize("module", [m for m in MODULES if m != "zssvd"])
def test_every_module_imports_alone(module):
    if module in NEEDS_VLLM and not _vllm_installed():
        pytest.skip("needs vLLM (the optional extra `vllm`)")
    run = _run(f"import {module}")
    assert run.returncode == 0, run.stderr


def _imports(path: Path, module: str) -> set[str]:
    """The zssvd modules ``module`` imports anywhere in its file (function bodies included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "zssvd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "zssvd":
                continue
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            subs = {f"{origin}.{a.name}" for a in node.names} & set(MODULES)
            found |= subs or {origin}
    return found & set(MODULES)


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p, _module_name(p)) - {_module_name(p)} for p in SOURCE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["zssvd.pipeline"] >= {"zssvd.stages.whitening", "zssvd.stages.selection"}  # the parser sees imports
