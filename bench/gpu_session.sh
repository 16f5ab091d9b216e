#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in parts that each end inside the device tool's
# 10-minute limit per command. Run from the repository root on the lent machine:
#
#     bash bench/gpu_session.sh quick      # FIRST: every headline figure in one table, <= 7 minutes
#                                          # (bench/gpu_quick.py; run tool: timeout_s=480)
#     bash bench/gpu_session.sh check      # GPU-only tests, then every kernel variant against float64
#     bash bench/gpu_session.sh kernels    # kernel timings (issue 3)
#     bash bench/gpu_session.sh serve      # LLaMA-7B-shaped decode/prefill, dense vs remap vs HQ (issue 4)
#     bash bench/gpu_session.sh compress   # LLaMA-7B-shaped compress, 256 x 2048 tokens (issue 6)
#     bash bench/gpu_session.sh capped     # the same with the GPU capped below the model (issue 6)
#     bash bench/gpu_session.sh tune       # tune block configs; timings in $OUT, configs in zskernels/configs
#
# The machine's own torch, Triton and transformers are used and nothing is installed: it has no
# network, and every dependency but gguf (only for .gguf inputs) is already there. Each part's log
# and results go to $OUT (or bench/results/), with the GPU name in the file names.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ZSSVD_QUIET=1
out="${OUT:-bench/results}"
mkdir -p "$out"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
log() { tee -a "$out/$1-$gpu.log"; }

case "${1:-}" in
  quick)  # the table lands in $OUT/quick-<gpu>-<date>.md; the progress lines in quick-<gpu>.log
    python3 bench/gpu_quick.py 2>&1 | log quick ;;
  check)
    python3 -m pytest -q -k gpu tests/ 2>&1 | log check
    python3 bench/run_all.py --check-only 2>&1 | log check ;;
  kernels)
    python3 bench/run_all.py 2>&1 | log kernels ;;
  serve)
    python3 bench/serve_scale.py --static 2>&1 | log serve ;;
  compress)
    python3 bench/compress_scale.py 2>&1 | log compress ;;
  capped)
    python3 bench/compress_scale.py --offload cpu --memory-cap-gib 8 2>&1 | log capped ;;
  tune)  # the raw timings come back in $OUT; `bench/tune_configs.py --from-dump` writes them here
    python3 bench/tune_configs.py --dump "$out/tune-$gpu.jsonl" 2>&1 | log tune
    cp zskernels/configs/*.json "$out/" ;;
  *)
    echo "usage: bash bench/gpu_session.sh quick|check|kernels|serve|compress|capped|tune" >&2
    exit 2 ;;
esac
