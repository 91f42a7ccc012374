#!/usr/bin/env bash
# The checks that need a CUDA device, as one script: the `gpu` tests, then the kernel benchmark with its
# Triton row, and the SFT step on CPU vs CUDA. Made for a lent GPU machine that has torch/triton/lightning
# but not this project's other dependencies: put their wheels in .whl/ first (see benchmarks/README.md,
# "CUDA"). Logs go to $OUT (or ./gpu_checks_out when OUT is unset).
set -o pipefail
OUT=${OUT:-gpu_checks_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf /tmp/site  # a warm machine keeps the last call's install
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, triton, transformers, peft, open_clip, lightning; \
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'open_clip', open_clip.__version__, 'lightning', \
lightning.__version__, 'cuda', torch.cuda.is_available())"
    nproc
} 2>&1 | tee "$OUT/env.txt"

# Only the files holding `gpu` tests (found, not listed, so a new one is never missed), so a module needing a
# dev-only package (trl) cannot stop collection.
gpu_test_files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
echo "gpu test files:" $gpu_test_files
# shellcheck disable=SC2086  # one word per file
timeout "${GPU_TEST_TIMEOUT:-360}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra --strict-markers" \
    $gpu_test_files 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?

[ -n "$SKIP_BENCH" ] && exit $tests_rc
# BENCHES picks the benchmarks (default both): kernels, sft (SFT step time, CPU vs CUDA, by language-model size).
case " ${BENCHES:-kernels sft} " in *" kernels "*)
    python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log"
    python3 benchmarks/bench_kernels.py --batch 4096 --n 64 --m 64 2>&1 | tee "$OUT/bench_kernels_large.log" ;;
esac
case " ${BENCHES:-kernels sft} " in *" sft "*)
    timeout "${SFT_BENCH_TIMEOUT:-300}" python3 benchmarks/bench_sft_device.py --shapes 128x2 256x4 512x8 \
        --batch-sizes 16 64 --rounds 8 2>&1 | tee "$OUT/bench_sft_device.log" ;;
esac
exit $tests_rc
