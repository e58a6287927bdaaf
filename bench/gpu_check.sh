#!/usr/bin/env bash
# One prepared GPU check (run on a machine with CUDA and a torch build that sees it):
#   1. the CUDA tests (replay on cuda equals the CPU in float64; the fused route on cuda);
#   2. bench/bench_check.py --device cuda: a full `rnndiag check` against one cuDNN
#      forward+backward of the same module, RNN/LSTM/GRU, uni- and bidirectional;
#   3. bench/bench_model.py --device cuda: `check --model` against a training step, each
#      recurrent layer as one fused-kernel node (LSTM, GRU, RNN), and the LSTM replayed step
#      by step (--step-replay).
# Uses the python3 on PATH and this checkout (PYTHONPATH), nothing installed. Writes logs to
# $OUT when set (else ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/machine.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -k "cuda or CUDA" \
  tests/test_cli_more.py tests/test_speed_paths.py tests/test_pergrad.py tests/test_graphed.py \
  tests/test_placement.py 2>&1 \
  | tee "$out/cuda_tests.log"
timeout 420 python3 bench/bench_check.py --device cuda --repeat 5 "$@" 2>&1 \
  | tee "$out/bench_cuda.log"
for cell in LSTM GRU RNN; do
  timeout 240 python3 bench/bench_model.py --device cuda --repeat 3 --cell $cell \
    --steps 100 400 1600 2>&1 | tee "$out/bench_model_cuda_$cell.log"
done
timeout 240 python3 bench/bench_model.py --device cuda --repeat 3 --steps 100 400 \
  --step-replay 2>&1 | tee "$out/bench_model_cuda_steps.log"
