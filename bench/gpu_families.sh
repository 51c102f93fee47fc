#!/usr/bin/env bash
# The GPU checks of README's models table in one device call: grpo.py (and TRL's GRPOTrainer, where TRL is
# installed) on Qwen3-VL-8B's and a Qwen3.5-9B-style model's shapes with random weights, in bf16 with sdpa
# attention: does every step run, at what steps/s and peak memory. Each model is built on the CPU from its
# family's toy model (bench/dpo_vs_trl.py ARCHS), about 18 GB written per model.
#   bash bench/gpu_families.sh                      # both families, both trainers where TRL is there
#   ARCHS=qwen3.5-9b ONLY=ours STEPS=6 bash bench/gpu_families.sh
# The device image's packages are not this project's pins (transformers 5.17 there, 5.23 here; no TRL): put
# wheels in wheels/ (pip download --no-deps -d wheels transformers==5.23.0 trl==1.16.0) and they are
# installed into a folder on PYTHONPATH first. Results: $OUT (or runs/gpu)/<arch>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/gpu_families}
mkdir -p "$RESULTS" "$WORK"
if compgen -G "wheels/*.whl" > /dev/null; then
    $PY -m pip install -q --no-deps --target "$WORK/site" wheels/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$RESULTS/versions.txt"
ONLY=${ONLY:-$($PY -c "import trl" 2> /dev/null && echo "" || echo ours)}
$PY tools/make_toy.py --out "$WORK/world" --families qwen2-vl,qwen3-vl,qwen3.5 --n_train 64 --n_questions 16 \
    --n_test 16 > /dev/null
for arch in ${ARCHS:-qwen3-vl-8b qwen3.5-9b}; do
    echo "=== $arch (at ${SECONDS} s)"
    $PY bench/grpo_vs_trl.py --toy "$WORK/world" --work "$WORK/$arch" --arch "$arch" --dtype bf16 --attn sdpa \
        --prompts 4 --G 8 --max_new_tokens 64 --steps "${STEPS:-8}" ${ONLY:+--only $ONLY} 2>&1 \
        | grep -v "it/s]" | tee "$RESULTS/$arch.txt"
    rm -rf "$WORK/$arch"  # 18 GB each
done
