#!/usr/bin/env bash
# Builds cudablocks on a GPU machine without network (CUDA toolkit, torch and the build tools
# already installed), runs the C++ tests, the GPU Python tests and the benchmarks, and writes
# every log under OUTDIR. Prints a short summary last.
#
#   scripts/gpu_check.sh OUTDIR [--quick] [--skip-bench] [--suites=classify,qlora_layer]
#
# Carry bitsandbytes as a wheel in .whl/ (see the README's GPU section) for the anchors that use it.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [--quick] [--skip-bench] [--suites=a,b]}
shift
quick=""; bench=1; only=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick="--quick" ;;
    --skip-bench) bench=0 ;;
    --suites=*) IFS=, read -r -a suites <<<"${arg#--suites=}"; only=(--only "${suites[@]}") ;;
  esac
done
mkdir -p "$out"
cd "$(dirname "$0")/.."
export CUDAARCHS=${CUDAARCHS:-90a}
# The host emulations of the attention kernels (tests/emu) only matter without a GPU.
export CUDABLOCKS_EMULATION_TESTS=${CUDABLOCKS_EMULATION_TESTS:-OFF}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PYTHONUNBUFFERED=1
status=0

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
echo "GPU: ${gpu:-none}" | tee "$out/summary.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1

# Wheels carried in .whl/ (bitsandbytes for the anchors: the GPU machines have no network).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$out/summary.txt"
  tail -n 40 "$out/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"

ctest --test-dir build --output-on-failure --no-tests=error >"$out/ctest.log" 2>&1 || status=1
grep -E "tests passed|tests failed" "$out/ctest.log" | tee -a "$out/summary.txt"
grep -E "Failed|\*\*\*" "$out/ctest.log" | head -n 20

python3 -m pytest -m gpu -v -rs >"$out/pytest_gpu.log" 2>&1 || status=1
echo "pytest -m gpu: $(tail -n 1 "$out/pytest_gpu.log")" | tee -a "$out/summary.txt"
grep -E "FAILED|Error" "$out/pytest_gpu.log" | head -n 20

# The main job on the shipped model and data, on the GPU.
python3 -m cudablocks classify train --device cuda:0 --no-progress --output "$out/classify-run" \
  >"$out/classify.log" 2>&1 || status=1
echo "classify train: $(grep -E '^validation' "$out/classify.log" || tail -n 1 "$out/classify.log")" | tee -a "$out/summary.txt"

if [ "$bench" = 1 ]; then
  python3 bench/run.py --out "$out" $quick "${only[@]}" >"$out/bench.log" 2>&1 || status=1
  tail -n 40 "$out/bench.log"
fi
echo "status: $status" | tee -a "$out/summary.txt"
exit $status
