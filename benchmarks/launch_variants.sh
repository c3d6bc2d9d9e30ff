#!/usr/bin/env bash
# Launch-setting variants of one Triton op on a GPU, each in processes of its own (a CUDA fault poisons the
# process that met it): the op's GPU test file under the variant, then its standard-shape timing.
#
#   OP=gla VARIANTS='|gla.intra.BK=64|gla.dqkg.num_warps=8' bash benchmarks/launch_variants.sh
#   OP=delta_rule TESTS='gpu' VARIANTS='gated_delta_rule.LOWP_DOTS.forward=1' bash benchmarks/launch_variants.sh
#
# VARIANTS: '|'-separated LINATTN_LAUNCH strings (see benchmarks/launch_override.py); an empty one is the
# library's own settings. TESTS: a pytest -k expression (default: the whole file). LENGTHS: as bench_gpu.py.
set -u
export COLUMNS=300 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "${OP:?set OP}" in
    gla) file=tests/ops/test_triton_gla.py ;;
    delta_rule | gated_delta_rule) file=tests/ops/test_triton_delta.py ;;
    linear_attn | simple_gla | retention) file=tests/ops/test_triton_decay.py ;;
    *) echo "unknown OP $OP" >&2; exit 2 ;;
esac
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
IFS='|' read -r -a variants <<< "${VARIANTS:-}"
[ ${#variants[@]} -eq 0 ] && variants=("")
for variant in "${variants[@]}"; do
    echo "=== variant: ${variant:-(library settings)}"
    LINATTN_LAUNCH="$variant" timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n "$workers" -p no:cacheprovider \
        -p benchmarks.launch_override -rf ${TESTS:+-k "$TESTS"} "$file" 2>&1 | grep -E "^FAILED|^ERROR|passed|failed" | cut -c1-200 | head -8
    [ "${PIPESTATUS[0]}" = 124 ] && echo "tests TIMED OUT after ${TEST_TIMEOUT:-300} s"
    LINATTN_LAUNCH="$variant" timeout "${BENCH_TIMEOUT:-90}" python3 -m benchmarks.bench_gpu --ops "$OP" --fla-lengths '' \
        --long '' --lengths "${LENGTHS:-4096}" 2>&1 | grep -E "linattn .*triton"
done
