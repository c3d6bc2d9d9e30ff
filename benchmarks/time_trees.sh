#!/usr/bin/env bash
# Time several source trees of linattn in one device call (branches against main, say), each in processes of its
# own, on the same card: optionally each tree's GPU tests of the ops' files, then the standard-shape timing.
#
#   here:    for r in main adjacent-blocks; do mkdir -p .gpu_src/$r && git archive $r | tar -x -C .gpu_src/$r; done
#   device:  TREES=".gpu_src/main .gpu_src/adjacent-blocks" OPS=delta_rule,gla TESTS=1 bash benchmarks/time_trees.sh
#
# OPS: bench_gpu.py's --ops (default delta_rule,gated_delta_rule,gla); LENGTHS: its --lengths (default 4096);
# LINATTN_LAUNCH, if set, applies to every tree. Each tree gets its own Triton cache directory.
set -u
export COLUMNS=300
ops="${OPS:-delta_rule,gated_delta_rule,gla}"
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
for tree in ${TREES:?set TREES to source trees, e.g. .gpu_src/main}; do
    echo "=== tree: $tree"
    (
        cd "$tree" || exit 1
        export PYTHONPATH="$PWD" TRITON_CACHE_DIR="/tmp/triton-$(basename "$tree")"
        if [ -n "${TESTS:-}" ]; then
            files=""
            case ",$ops," in *,delta_rule,* | *,gated_delta_rule,*) files="$files tests/ops/test_triton_delta.py tests/ops/test_triton_properties.py" ;; esac
            case ",$ops," in *,gla,*) files="$files tests/ops/test_triton_gla.py" ;; esac
            timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -n "$workers" -p no:cacheprovider -p benchmarks.launch_override \
                -rf $files 2>&1 | grep -E "^FAILED|^ERROR|passed|failed" | cut -c1-200 | head -8
        fi
        timeout "${BENCH_TIMEOUT:-150}" python3 -m benchmarks.bench_gpu --ops "$ops" --fla-lengths '' --long '' \
            --lengths "${LENGTHS:-4096}" 2>&1 | grep -E "linattn .*triton|Error" | cut -c1-200
    )
done
