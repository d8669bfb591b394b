#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (issue 9), with synthetic data (no TFDS needed),
# in order of importance, so that a run cut short keeps the first figures:
#   1. the CIFAR10 model's train step at batch 128, float32 and bfloat16, steps_per_call 1 and 8
#      (one process: the four variants compile at once, then are timed round by round);
#   2. 256 samples x 1000 ancestral steps and 256 x DDIM-50, float32 and bfloat16;
#   3. the 256x256 model's train step at batch 16, bfloat16, without and with remat, each in its
#      own process so that the device's peak memory is its own.
# Usage: bash benchmarks/gpu.sh [OUT_DIR] [--reduced]
#   OUT_DIR gets results.jsonl (for benchmarks/chart.py); figures go to stdout.
#   --reduced: the same commands on the digits model, to check the script on a CPU.
# PEAK_TFLOPS: the device's dense bfloat16 peak (default: the H100 SXM's 989; float32 matmuls run
# on TF32 tensor cores, whose peak is half of it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/ddpm_gpu_benchmarks}"
mkdir -p "$out"
json="$out/results.jsonl"
rm -f "$json"
if [[ "${2:-}" == "--reduced" ]]; then
  cifar="--config=digits --batch_size=8 --windows=2 --calls_per_window=1"
  big="--config=digits --batch_size=8 --windows=2 --calls_per_window=1"
  samples="--config=digits --num_images=8 --windows=1"
  k=2
else
  cifar="--config=cifar10 --batch_size=128 --windows=3 --calls_per_window=2"
  big="--config=celebahq256 --batch_size=16 --windows=3 --calls_per_window=3"
  samples="--config=cifar10 --num_images=256 --windows=2"
  k=8
fi
peak="${PEAK_TFLOPS:-989}"
status=0
python="${PYTHON:-python3}"
run() {
  echo "+ $*"
  PYTHONUNBUFFERED=1 "$python" "$@" --json_out="$json" 2>&1 | grep -v -E "^(W|I)[0-9]{4} |^WARNING" \
    || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$python" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

run benchmarks/train.py $cifar --dtype=float32,bfloat16 --steps_per_call=1,$k \
  --peak_tflops="$peak"
run benchmarks/sample.py $samples --sampler=ancestral,ddim --steps=50 \
  --dtype=float32,bfloat16
run benchmarks/train.py $big --dtype=bfloat16 --peak_tflops="$peak"
run benchmarks/train.py $big --dtype=bfloat16 --remat --peak_tflops="$peak"
echo "results: $json"
exit $status
