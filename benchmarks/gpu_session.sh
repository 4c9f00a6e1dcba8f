#!/bin/bash
# The GPU checks of one device lease, from a repository copy on a machine with CUDA, torch and
# triton but without recdsl or its peers installed (and no network): wheels carried in .whl/
# (recdsl's own, `python -m pip wheel --no-deps --no-build-isolation -w .whl .`; lark; and the
# optional peers flash-linear-attention, fla-core, accelerated-scan), installed to /tmp/site.
# Results go to $OUT (or ./gpu-results).  Sections can be skipped: SKIP_TESTS=1, SKIP_BENCH=1.
#
#     bash benchmarks/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-$PWD/gpu-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
# A copy without the source tree, so that `import recdsl` finds the installed wheel
# (the source's recdsl/ lacks recdsl.backends, which lives in backends/).
mkdir -p /tmp/recdsl-run && cp -r tests examples benchmarks pyproject.toml /tmp/recdsl-run/ && cd /tmp/recdsl-run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, recdsl; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# accelerated-scan's CUDA scan is built by nvcc at its first import: build it beside the tests
[ -n "${SKIP_BENCH:-}" ] || (timeout 300 python3 -c "import accelerated_scan.warp" > "$out/warp_build.log" 2>&1 &)
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --timeout 150 --timeout_method thread -rf tests/test_gpu.py > "$out/tests.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED" "$out/tests.log" | tail -30
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout "${BENCH_SECONDS:-200}" python3 benchmarks/bench_triton.py --repeat 5 --sequential-max-length 0 ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
fi
