#!/usr/bin/env bash
# The bundled model's recipe on a GPU (benchmarks/train_bundled.py) with time limits, after the CUDA
# tests and training/sampler benchmarks. (The throughput session is benchmarks/gpu_session.sh.)
#
#   OUT=/tmp/gpu COPGEN_SHARED=/path/to/shared bash benchmarks/gpu_train_bundled.sh [AE_SECONDS] [NET_SECONDS]
#
# CHECKS=0 skips the tests and benchmarks; TRAIN_ARGS adds arguments to train_bundled.py (e.g. start
# from an earlier run: "--ae DIR/autoencoder.safetensors --net-init DIR/network.safetensors").
# Logs and the trained model (tar, split in 15 MiB parts) land in $OUT. The network's time is cut so the
# whole script ends within TOTAL seconds (default 540). DEVICE=cpu BLOCKS=1 ROWS=2 with small limits is
# a smoke run of the script itself.
set -u
START=$(date +%s)
TOTAL=${TOTAL:-540}
OUT=${OUT:-/tmp/gpu_session}
AE_TIME=${1:-70}
NET_TIME=${2:-260}
DEVICE=${DEVICE:-cuda}
BLOCKS=${BLOCKS:-9}
ROWS=${ROWS:-7}
WORK=${WORK:-/tmp/copgen_bundled}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

# copgen.flows.train only needs prefect's @flow decorator; a GPU image without prefect gets a pass-through one
if ! $PY -c "import prefect" 2>/dev/null; then
  mkdir -p /tmp/copgen_shim/prefect
  printf 'def flow(*args, **kwargs):\n    return args[0] if args and callable(args[0]) else (lambda f: f)\n' \
    >/tmp/copgen_shim/prefect/__init__.py
  export PYTHONPATH="/tmp/copgen_shim:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

# the training world is CPU work: write it while the GPU runs the tests and benchmarks
$PY benchmarks/train_bundled.py --out "$WORK" --world-only --blocks "$BLOCKS" --rows "$ROWS" --cols "$ROWS" \
  --workers "$BLOCKS" >"$OUT/world.log" 2>&1 &
world_pid=$!

if [ "$DEVICE" = cuda ] && [ "${CHECKS:-1}" = 1 ]; then
  timeout 90 $PY -m pytest -q -p no:cacheprovider tests/core/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
  {
    timeout 100 $PY benchmarks/sampler.py --device cuda --configs tiny,release --batch-sizes 1,8,32 \
      --dtypes fp32,bf16 --steps 10 --repeats 2
    timeout 45 $PY benchmarks/train_speed.py --device cuda --names ae-32-1122-r2 net-192-d8-p2 \
      --ae-batch 16 32 64 --net-batch 32 128 512 --steps 30 --warmup 5
    timeout 30 $PY benchmarks/train_speed.py --device cuda --bf16 --only net --names net-192-d8-p2 \
      --net-batch 128 512 --steps 30 --warmup 5
  } 2>&1 | tee "$OUT/bench.log"
fi

wait "$world_pid"
cat "$OUT/world.log"
left=$((TOTAL - ($(date +%s) - START) - AE_TIME - 50))  # 50 s: data, encoding, evaluation, tar
NET_TIME=$((left < NET_TIME ? left : NET_TIME))
NET_TIME=$((NET_TIME < 5 ? 5 : NET_TIME))
echo "training: autoencoder ${AE_TIME} s, network ${NET_TIME} s"
$PY benchmarks/train_bundled.py --out "$WORK" --device "$DEVICE" --blocks "$BLOCKS" --rows "$ROWS" \
  --cols "$ROWS" --ae-time "$AE_TIME" --net-time "$NET_TIME" --net-batch "${NET_BATCH:-128}" \
  ${TRAIN_ARGS:-} >"$OUT/train.log" 2>&1
grep -v " step [0-9]*/" "$OUT/train.log" | tail -12
grep " step [0-9]*/" "$OUT/train.log" | awk 'NR % 10 == 0' | tail -12
tar -C "$WORK" --exclude='*_train_state.pt' -cf - model | split -b 15m - "$OUT/model.tar.part-"
ls -la "$OUT"
