#!/usr/bin/env bash
# Device check: on a machine with an NVIDIA GPU and the usual CUDA / PyTorch / Triton
# stack (no network needed), build the extension with its CUDA kernels, run the GPU
# tests, run compute-sanitizer's memcheck over the layout fuzz, run the benchmark suites on the GPU,
# and print the report's targets table last.
# Logs, the results JSON and REPORT.md go to OUT_DIR (copy the JSON into bench/results/
# to keep it; each row is saved as it is measured, so a step its timeout cuts short keeps its rows). Name steps to run fewer (the build is always done), e.g. calls of under 10 minutes each:
#
#   bench/gpu_check.sh OUT_DIR                     tests, memcheck and bench (PYTHON=python3 by default)
#   bench/gpu_check.sh OUT_DIR tests memcheck      build, GPU tests (hard inputs, compile, no host sync), memcheck
#   bench/gpu_check.sh OUT_DIR bench               build, op and model benchmarks (with the measured memory peaks)
#   bench/gpu_check.sh OUT_DIR train               build, the training-step suite: official, reference, fastp2phd,
#                                                  channels_last, cudnn.benchmark
#                                                  and --compile reduce-overhead (compiles: minutes)
#   bench/gpu_check.sh OUT_DIR inference           build, the inference-precision suite (fp32, bf16,
#                                                  fp16, torch.compile, CUDA graphs: compiles, ~5 min)
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [tests] [memcheck] [bench] [train] [inference]}
shift
steps=${*:-tests memcheck bench}
wants() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

step() { echo "== $1 ($(date +%H:%M:%S))"; }

step "build"
if ! FORCE_CUDA=1 timeout 240 "$py" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    echo "build failed:"; tail -40 "$out/build.log"; exit 1
fi
"$py" -m fastp2phd info | tee "$out/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/gpu.txt" 2>&1

if wants tests; then
step "GPU tests"
timeout 300 "$py" -m pytest tests/ops/test_cuda.py tests/ops/*/test_cuda*.py tests/ops/test_triton_compile.py \
    tests/test_compiling.py -q -p no:cacheprovider >"$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
# The hard-input accuracy suite on the Triton kernels, compiled this time (the interpreter runs it everywhere).
timeout 120 "$py" -m pytest tests/ops/instance_norm_act/test_hard_inputs.py -q -p no:cacheprovider -k "cuda" \
    >"$out/hard-inputs.log" 2>&1 || status=1
tail -3 "$out/hard-inputs.log"
fi

if wants memcheck; then
step "memcheck"
# compute-sanitizer over the layout fuzz (every CUDA and Triton kernel, forward and backward, on views):
# an out-of-bounds access fails the step. Without the caching allocator every tensor is its own
# allocation, so an access past a tensor's end is outside any allocation and is reported.
if command -v compute-sanitizer >/dev/null 2>&1; then
    if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 \
        "$py" -m pytest tests/ops/*/test_cuda.py -q -x -p no:cacheprovider -k "views and -0]" >"$out/memcheck.log" 2>&1; then
        echo "memcheck: no errors"
    else
        status=1; echo "memcheck: FAILED"; grep -m5 -E "Invalid|ERROR SUMMARY|failed|Error" "$out/memcheck.log"
    fi
    grep -m1 "ERROR SUMMARY" "$out/memcheck.log"
else
    echo "memcheck: skipped, compute-sanitizer not found" | tee "$out/memcheck.log"
fi
fi

if wants bench; then
step "benchmarks"
timeout 360 "$py" -m pytest bench --bench-device cuda --bench-out "$out" -q -p no:cacheprovider \
    --ignore=bench/bench_inference.py -k "not test_training_step" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name >"$out/bench.log" 2>&1 || status=1
cp bench/REPORT.md "$out/REPORT.md" 2>/dev/null
fi

if wants train; then
step "training step"
timeout 540 "$py" -m pytest bench/bench_models.py -k test_training_step --bench-device cuda --bench-out "$out" -q \
    -p no:cacheprovider --benchmark-columns=median,iqr,rounds >"$out/train.log" 2>&1 || status=1
cp bench/REPORT.md "$out/REPORT.md" 2>/dev/null
tail -3 "$out/train.log"
fi

if wants inference; then
step "inference precision"
timeout 360 "$py" -m pytest bench/bench_inference.py --bench-device cuda --bench-out "$out" -q \
    -p no:cacheprovider --benchmark-columns=median,iqr,rounds >"$out/inference.log" 2>&1 || status=1
cp bench/REPORT.md "$out/REPORT.md" 2>/dev/null
tail -3 "$out/inference.log"
fi

step "results"
# The report's targets table for this GPU, then the end of the log.
if wants bench; then
    sed -n '/^## cuda/,/^### memory copy/p' "$out/REPORT.md" | grep -E "^\||^## |^- run" | head -60
    tail -3 "$out/bench.log"
fi
[ $status -eq 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: a step FAILED (see $out/*.log)"
exit $status
