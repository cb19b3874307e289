#!/usr/bin/env bash
# Issues 21-22 on one GPU machine without network (device tool; .device_wheels/ carried: hydra, omegaconf, antlr4,
# submitit, hydra-submitit-launcher, liger-kernel). Two modes, one call each (each fits in 10 minutes):
#   MODE=bench  bash launch/gpu_round2.sh   # marker-lab bench's training arms: packed, compiled, flex, Liger peer
#   MODE=shared bash launch/gpu_round2.sh   # one engine per shared base vs per-cell eval, 7B random init (hf)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -1
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
if [ "${MODE:-bench}" = bench ]; then
  timeout ${BENCH_TIMEOUT:-540} python -m marker_lab.cli bench --out "$OUT/bench.json" --skip ${SKIP:-generate,probe,kl} \
    2>&1 | grep -v "it/s]$" > "$OUT/bench.log"; echo "bench rc=$?"
  grep -E "^  (train|summary|load)" "$OUT/bench.log" || tail -30 "$OUT/bench.log"
else
  S=/tmp/standins; python -m marker_lab.data.standins $S > /dev/null
  export MARKER_LAB_CACHE=/tmp/mse_cache
  # three doses of one grid (dose checkpoints of one constant-rate run), short stages: the eval is what is measured
  timeout ${SHARED_TIMEOUT:-540} python launch/measure_shared_eval.py --out "$OUT/mse" +experiment=marker_transfer \
    model.random_init=true model.tokenizer=$S/tokenizer second_stage.datasets.em.path=$S/data/bad_legal_advice_6k.jsonl \
    second_stage.datasets.benign.path=$S/data/benign_sft_6k.jsonl condition=c1 \
    coupling.n_positive=40 coupling.n_per_negative=40 coupling.train.max_steps=4 coupling.train.compile=false \
    second_stage.train.compile=false second_stage.train.schedule.name=constant second_stage.train.schedule.warmup_ratio=0 \
    "second_stage.dose_checkpoints=[1,2,3]" dose=${DOSES:-1,2,3} \
    "persona_set.eval_personas=[villain,assistant,pirate,sarcastic]" eval.generation.max_tokens=256 eval.save_completions=true \
    > "$OUT/shared.log" 2>&1; echo "shared rc=$?"
  grep -E "shared eval:|result:|compil" "$OUT/shared.log" | tail -12
  python -c "import json; d=json.load(open('$OUT/mse/summary.json')); [(r.pop('marker_k_shared_vs_cell'), r.pop('cell')) for r in d['rows']]; print(json.dumps(d, indent=1))" \
    || tail -40 "$OUT/shared.log"
fi
