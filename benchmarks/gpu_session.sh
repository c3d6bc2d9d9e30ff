#!/usr/bin/env bash
# Everything a GPU session should check, in one call (device time is scarce; each call starts a machine):
# the Triton ops' GPU tests, then the standard-shape benchmark of every Triton op without fla (fla autotunes
# for minutes per shape: add --fla-lengths 4096 to bench_gpu.py when there is time for it).
#
#   bash benchmarks/gpu_session.sh                 # tests, then the benchmark
#   TESTS_ONLY=1 bash benchmarks/gpu_session.sh    # tests only
#   FLA_LENGTHS=4096 bash benchmarks/gpu_session.sh # with fla beside ours at T = 4096 (minutes of autotuning)
set -u
export COLUMNS=300  # pytest's summary lines carry the error message: keep them whole
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
# Each file gets TEST_TIMEOUT seconds (default 300: the delta-rule file took 160 s on an H200 in session 5, most of it
# compiling). One pytest process per file: a CUDA fault (an illegal memory access) poisons every later test of the process
# that met it, and a shared pool of workers would spread one file's fault over the others' results.
for file in tests/ops/test_triton_decay.py tests/ops/test_triton_delta.py tests/ops/test_triton_gla.py tests/ops/test_decode.py \
    tests/ops/test_triton_properties.py; do
    echo "== $file"
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n "$workers" -p no:cacheprovider -rf "$file" \
        2>&1 | grep -E "^FAILED|^ERROR|passed|failed" | cut -c1-300
    [ "${PIPESTATUS[0]}" = 124 ] && echo "TIMED OUT after ${TEST_TIMEOUT:-300} s (no summary line above means no result)"
done
if [ -z "${TESTS_ONLY:-}" ]; then
    # FLA_LENGTHS=4096 adds fla's kernels at that length (install its wheels first, see shared/BENCHMARKS.md)
    timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --fla-lengths "${FLA_LENGTHS:-}" --long '' \
        --lengths "${LENGTHS:-4096,65536}"
fi
