#!/usr/bin/env bash
# The GPU-only checks (cuDNN attention against blocked attention, a bf16 train step,
# generation) and the one-GPU benchmarks (scripts/bench.py on configs/gpt2-124m.yaml and
# configs/gpt2-1.3b.yaml), on a machine with an NVIDIA GPU, in a few minutes; one summary
# table, then one JSON line; exit 1 if a check fails.
#
#     bash scripts/gpu_check.sh            # PYTHON=/path/to/python3 picks the interpreter
#
# Runs on the GPU machine's image as it is (jax with CUDA, flax, optax, orbax; no pytest,
# no install step): the repository is put on PYTHONPATH. `--smoke` runs the same code on
# tiny shapes on any machine (the test suite does, on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
