#!/usr/bin/env bash
# Everything a GPU session should check, in one call (device time is scarce; each call starts a machine):
# the Triton ops' GPU tests, then the standard-shape benchmark of every Triton op without fla (fla autotunes
# for minutes per shape: add --fla-lengths 4096 to bench_gpu.py when there is time for it).
#
#   bash benchmarks/gpu_session.sh                 # tests, then the benchmark
#   TESTS_ONLY=1 bash benchmarks/gpu_session.sh    # tests only
set -u
export COLUMNS=300  # pytest's summary lines carry the error message: keep them whole
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n "$workers" -p no:cacheprovider -rf \
    tests/ops/test_triton_decay.py tests/ops/test_triton_delta.py tests/ops/test_triton_gla.py tests/ops/test_decode.py \
    2>&1 | grep -E "^FAILED|^ERROR|passed|failed" | cut -c1-300
if [ -z "${TESTS_ONLY:-}" ]; then
    timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --fla-lengths '' --long '' --lengths 4096,65536
fi
