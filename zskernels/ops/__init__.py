"""The ops, one package each: ``kernels.py`` (jitted kernels, host launcher and dispatch, op
registration, the public op) beside ``naive.py`` (argument checks and the plain-torch reference)."""
