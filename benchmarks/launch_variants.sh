#!/usr/bin/env bash
# Launch-setting variants, or source trees (branches against main), of Triton ops on a GPU, each in processes of
# its own (a CUDA fault poisons the process that met it): the ops' GPU test files, then the standard-shape timing.
#
#   OP=gla VARIANTS='|gla.intra.BK=64|gla.dqkg.num_warps=8' bash benchmarks/launch_variants.sh
#   OP=delta_rule TESTS='gpu' VARIANTS='gated_delta_rule.LOWP_DOTS.forward=0' bash benchmarks/launch_variants.sh
#   here:    for r in main adjacent-blocks; do mkdir -p .gpu_src/$r && git archive $r | tar -x -C .gpu_src/$r; done
#   device:  TREES=".gpu_src/main .gpu_src/adjacent-blocks" OP=delta_rule,gla bash .gpu_src/main/benchmarks/launch_variants.sh
#
# OP: one op or a comma-separated list (bench_gpu.py's --ops). VARIANTS: '|'-separated LINATTN_LAUNCH strings (see
# benchmarks/launch_override.py); an empty one is the library's own settings. TREES: source trees, each run with
# its own code and Triton cache (default: this one). TESTS: a pytest -k expression (default: the whole files);
# NO_TESTS=1 times only, NO_BENCH=1 tests only. LENGTHS: as bench_gpu.py (default 4096); BENCH_ARGS: more of its
# arguments (e.g. --qk-l2norm). PROFILE=1: then each kernel's share (benchmarks/profile_kernels.py at T = PROFILE_T,
# default 4096, with PROFILE_ARGS, e.g. --qk-l2norm).
set -u
export COLUMNS=300
ops="${OP:?set OP}"
files=""
case ",$ops," in *,delta_rule,* | *,gated_delta_rule,*) files="$files tests/ops/test_triton_delta.py tests/ops/test_triton_properties.py" ;; esac
case ",$ops," in *,gla,*) files="$files tests/ops/test_triton_gla.py" ;; esac
case ",$ops," in *,linear_attn,* | *,simple_gla,* | *,retention,*) files="$files tests/ops/test_triton_decay.py" ;; esac
[ -z "$files" ] && { echo "unknown OP $ops" >&2; exit 2; }
case ",$ops," in *delta_rule,* | *,gla,*) files="$files tests/ops/test_triton_tables.py" ;; esac  # their shared tables
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
IFS='|' read -r -a variants <<< "${VARIANTS:-}"
[ ${#variants[@]} -eq 0 ] && variants=("")
case "${VARIANTS:-}" in *'|') variants+=("") ;; esac  # read drops a trailing empty one (main again, last)
for tree in ${TREES:-.}; do
    for variant in "${variants[@]}"; do
        echo "=== tree: $tree, variant: ${variant:-(library settings)}"
        (
            cd "$tree" || exit 1
            export PYTHONPATH="$PWD" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache}-$(basename "$PWD")"
            export LINATTN_LAUNCH="$variant"
            if [ -z "${NO_TESTS:-}" ]; then
                log=$(mktemp)
                timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n "$workers" -p no:cacheprovider \
                    -p benchmarks.launch_override -rf ${TESTS:+-k "$TESTS"} $files > "$log" 2>&1
                [ $? = 124 ] && echo "tests TIMED OUT after ${TEST_TIMEOUT:-300} s"
                # the first failures, then pytest's count line (which a long list of failures must not hide)
                grep -E "^FAILED|^ERROR" "$log" | cut -c1-200 | head -8
                grep -E "passed|failed|error" "$log" | grep -vE "^FAILED|^ERROR" | tail -1 | cut -c1-200
                rm -f "$log"
            fi
            if [ -z "${NO_BENCH:-}" ]; then
                timeout "${BENCH_TIMEOUT:-150}" python3 -m benchmarks.bench_gpu --ops "$ops" --fla-lengths '' \
                    --long '' --lengths "${LENGTHS:-4096}" ${BENCH_ARGS:-} 2>&1 | grep -E "linattn .*triton|Error" | cut -c1-200
            fi
            if [ -n "${PROFILE:-}" ]; then
                timeout "${PROFILE_TIMEOUT:-100}" python3 benchmarks/profile_kernels.py --ops "$ops" --T "${PROFILE_T:-4096}" \
                    ${PROFILE_ARGS:-} 2>&1 \
                    | grep -E "ms of kernels|_kernel|Error" | cut -c1-110
            fi
        )
    done
done
