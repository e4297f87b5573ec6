#!/usr/bin/env bash
# One device call that runs every GPU check of the studio and keeps each log under $OUT.
# Usage (on the device machine, repo root, wheels carried in .whl): bash benchmarks/gpu_session.sh STAGE...
# Stages: tests engine subspace train_speed quality quality_budget multi_gpu (default: all but the quality ones and multi_gpu;
# multi_gpu wants 2 GPUs). quality_budget takes QUALITY_STYLES / QUALITY_ROWS from the environment.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"

stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name exit $? ($(date +%T))"
  tail -n 40 "$OUT/$name.log"
}

stages=${*:-tests engine subspace train_speed}
for s in $stages; do
  case $s in
    tests) stage tests 180 python3 -m pytest -q -m gpu tests/train tests/engine tests/subspace tests/adapters -p no:cacheprovider ;;
    engine) stage engine 240 python3 benchmarks/engine_switch.py ;;
    subspace) stage subspace 590 bash -c "python3 benchmarks/subspace_extract.py --device cuda --files sdxl --n 20 --rank 32 --k 14 --repeat 2 && python3 benchmarks/subspace_extract.py --device cuda --files sd15 --n 1000 --rank 16 --k 14 && python3 benchmarks/subspace_extract.py --kernel --device cuda --max-layers 12 --profile" ;;
    train_speed) stage train_speed 150 bash -c "python3 benchmarks/train_speed.py && python3 benchmarks/train_speed.py --k 7 --families lora,eigenlora" ;;
    multi_gpu) stage multi_gpu 590 python3 benchmarks/multi_gpu_train.py --processes 2 ;;
    quality_budget) stage quality_budget 590 python3 benchmarks/quality.py --device cuda --tables families --rows ${QUALITY_ROWS:-lora-zoo-budget,lora-zoo-budget-no-cross-kv,lora-zoo-budget-conv,eigenlora-zoo-budget,lora,eigenlora} --styles ${QUALITY_STYLES:-pinstripe,polka,sepia,hueshift} --captions end --reg 64 --pairs 1024 --budget-s 470 --out $OUT/quality-budget ;;
    quality) stage quality 590 python3 benchmarks/quality.py --device cuda --eval-every 30 --out $OUT/quality.md ;;
  esac
done
