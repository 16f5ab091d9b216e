"""Run as a script (``python hf_loads.py DIR...``) under some transformers version: loads each checkpoint
with ``zssvd.load`` and with ``AutoModelForCausalLM.from_pretrained`` (stored dtype and float32) and
prints one JSON line per checkpoint saying whether the logits are identical. test_hf_quantizer.py runs
it in a subprocess against other transformers installs (``ZSSVD_OTHER_TRANSFORMERS``)."""
import json
import sys

import torch


def compare(directory: str) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    import zssvd

    ids = torch.arange(24).reshape(2, 12) % 90
    result = {"dir": directory, "transformers": transformers.__version__}
    for label, dtype in (("stored", None), ("float32", torch.float32)):
        ours = zssvd.load(directory, dtype=dtype)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        theirs = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        result[label] = {"equal": bool(torch.equal(a, b)), "dtype": str(b.dtype), "class": type(theirs).__name__}
    return result


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(compare(path)))
