#!/usr/bin/env bash
# The GPU checks of README's models table in one device call: grpo.py (and TRL's GRPOTrainer, where TRL is
# installed) on Qwen3-VL-8B's and a Qwen3.5-9B-style model's shapes with random weights, in bf16 with sdpa
# attention: does every step run, at what steps/s and peak memory; and on Qwen3-VL-8B's shapes the shared-prefix
# log-probs (bench/shared_prefix.py) against each sequence run whole, in bf16. Each model is built on the GPU from
# its family's toy model (bench/dpo_vs_trl.py ARCHS), about 18 GB written per model. A failing step is reported
# and the next one runs.
#   bash bench/gpu_families.sh                      # both families, both trainers where TRL is there
#   ARCHS=qwen3.5-9b ONLY=ours STEPS=6 bash bench/gpu_families.sh
# The device image's packages are not this project's pins (transformers 5.17 there, 5.23 here; no TRL): put
# wheels in wheels/ (pip download --no-deps -d wheels transformers==5.23.0 trl==1.16.0) and they are
# installed into a folder on PYTHONPATH first. Results: $OUT (or runs/gpu)/<arch>.txt; WORK (default
# /tmp/gpu_families) holds the built models and the wheels' folder; PYTHON names the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/gpu_families}
mkdir -p "$RESULTS" "$WORK"
if compgen -G "wheels/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" wheels/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$RESULTS/versions.txt"
ONLY=${ONLY:-$($PY -c "import trl" 2> /dev/null && echo "" || echo ours)}
$PY tools/make_toy.py --out "$WORK/world" --families qwen2-vl,qwen3-vl,qwen3.5 --n_train 64 --n_questions 16 \
    --n_test 16 > /dev/null
for arch in ${ARCHS:-qwen3-vl-8b qwen3.5-9b}; do
    case $arch in  # a name of dpo_vs_trl.ARCHS, never a path: its folder under $WORK is removed after each run
        "" | .* | *[!a-z0-9.-]*) echo "error: ARCHS: '$arch' is not an architecture name" >&2; exit 1 ;;
    esac
    echo "=== $arch (at ${SECONDS} s)" | tee "$RESULTS/$arch.txt"
    $PY bench/grpo_vs_trl.py --toy "$WORK/world" --work "$WORK/$arch" --arch "$arch" --dtype bf16 --attn sdpa \
        --prompts 4 --G 8 --max_new_tokens 64 --steps "${STEPS:-8}" ${ONLY:+--only $ONLY} 2>&1 \
        | grep --line-buffered -v "it/s]" | tee -a "$RESULTS/$arch.txt" || echo "FAILED: grpo_vs_trl.py $arch" | tee -a "$RESULTS/$arch.txt"
    if [ "$arch" = qwen3-vl-8b ] && [ -d "$WORK/$arch/model" ]; then  # Qwen3.5 runs sequences whole (recurrent state)
        echo "=== shared prefix, $arch (at ${SECONDS} s)" | tee -a "$RESULTS/$arch.txt"
        $PY bench/shared_prefix.py --model "$WORK/$arch/model" --data "$WORK/world/data/questions.jsonl" \
            --dtype bf16 --prompts 4 --num_generations 8 --repeats 3 2>&1 | grep --line-buffered -v "it/s]" \
            | tee -a "$RESULTS/$arch.txt" || echo "FAILED: shared_prefix.py $arch" | tee -a "$RESULTS/$arch.txt"
    fi
    rm -rf "$WORK/$arch"  # 18 GB each
done
echo "done at ${SECONDS} s"
