#!/usr/bin/env bash
# Adai's CUDA measurements in one command (see benchmarks/gpu_suite.py): a markdown report on stdout,
# exit status 1 on any exactness error or failed section.
#   benchmarks/gpu_suite.sh                 # one GPU, under 8 minutes
#   benchmarks/gpu_suite.sh --device cpu    # dry run on CPU (Triton's interpreter, tiny sizes)
# Extra arguments go to gpu_suite.py (--sections, --models, --rounds, ...). Python: $PYTHON, else python3.
# Compiler and profiler logs go to $GPU_SUITE_LOG (default: a temporary file), shown when it fails.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --device cpu "* ]]; then
    export TRITON_INTERPRET=1  # before Triton is imported: its kernels then run on CPU tensors
fi
log=${GPU_SUITE_LOG:-$(mktemp -t gpu_suite.XXXXXX.log)}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@" 2>"$log"
status=$?
if [[ $status -ne 0 ]]; then
    echo "gpu_suite: FAILED (exit $status); last lines of $log:" >&2
    tail -n 40 "$log" >&2
fi
exit $status
