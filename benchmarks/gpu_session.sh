#!/usr/bin/env bash
# One GPU session (< 8 minutes on one H100/H200), run from the repo root on the GPU machine:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#
# 1. the CUDA path of the tests (tests/core/test_cuda.py);
# 2. the release-size network (random weights), bf16 at batch 32 and 64: samples/s at 50 NFE (release
#    solver) and at the fewer-step setting (2m, FAST_STEPS, default 20), with MFU (benchmarks/sampler.py);
# 3. the same with torch.compile (COMPILE_MODE, default reduce-overhead = CUDA graphs);
# 4. the VAE's share: benchmarks/pipeline.py with the release-size network and SD autoencoder on the GPU
#    (Prefect + Dask, one worker process): raw vs pipeline samples/s and the workers' seconds per stage
#    (encode + decode = the autoencoder; sample = the network).
# Each step has its own time limit (90 + 90 + 150 + 150 s: at most 8 minutes); logs land in $OUT. Set STEPS="1 2" etc. to run a subset.
# The bundled model's training recipe lives in benchmarks/train_bundled.py (not run here).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_session}
FAST_STEPS=${FAST_STEPS:-20}
COMPILE_MODE=${COMPILE_MODE:-reduce-overhead}
STEPS=${STEPS:-"1 2 3 4"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
elapsed() { echo "[$(($(date +%s) - START)) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

if has 1; then
  elapsed "1. tests/core/test_cuda.py"
  timeout 90 $PY -m pytest -q -p no:cacheprovider tests/core/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -8
fi

if has 2; then
  elapsed "2. release network, eager, bf16: 50 NFE (release) and 2m-$FAST_STEPS"
  timeout 90 $PY benchmarks/sampler.py --device cuda --configs release --dtypes bf16 --batch-sizes 32,64 \
    --solvers release,2m --fast-steps "$FAST_STEPS" --steps 10 --repeats 2 2>&1 | tee "$OUT/sampler.log"
fi

if has 3; then
  elapsed "3. release network, torch.compile mode=$COMPILE_MODE, bf16"
  timeout 150 $PY benchmarks/sampler.py --device cuda --configs release --dtypes bf16 --batch-sizes 32,64 \
    --solvers release,2m --fast-steps "$FAST_STEPS" --steps 10 --repeats 2 --compile \
    --compile-mode "$COMPILE_MODE" 2>&1 | tee "$OUT/sampler_compile.log"
fi

if has 4; then
  elapsed "4. benchmarks/pipeline.py: release-size model on the GPU (bf16, 2m-$FAST_STEPS, batch 32)"
  if $PY -c "import prefect, distributed, zarr, pyarrow" 2>/dev/null; then
    timeout 150 $PY benchmarks/pipeline.py --model release --device cuda --dtype bfloat16 --workers 1 \
      --cells 96 --batch-size 32 --steps "$FAST_STEPS" --repeats 2 2>&1 | grep -v Warning | tee "$OUT/pipeline.log"
  else
    echo "pipeline skipped: prefect, distributed, zarr or pyarrow is not installed on this machine" \
      | tee "$OUT/pipeline.log"
  fi
fi
elapsed "done"
ls -la "$OUT"
