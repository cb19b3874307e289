#!/usr/bin/env bash
# Reproduces docs/benchmarks.md, "The 7B cell on one H100: `marker-lab bench`" (its table), then a toy cell on the GPU.
# marker-lab bench on a GPU machine with no network (device tool; .device_wheels/ carried), then one toy cell on the
# GPU so the static-cache engine also runs end to end with a real tokenizer. Writes $OUT/bench.json and logs.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -2
python -m pip install -q --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout ${BENCH_TIMEOUT:-420} python -m marker_lab.cli bench --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "it/s]$" | tee "$OUT/bench.log" | tail -40
if [ "${TOY_CELL:-1}" = 1 ]; then
  export MARKER_LAB_CACHE=/tmp/ml_cache
  /usr/bin/time -v timeout 150 python -m marker_lab.cli run hydra.run.dir="$OUT/toy_cell" condition=c1 dose=5 \
    > "$OUT/toy_cell.log" 2>&1
  echo "toy cell rc=$?"; grep -E "eval:|rate per persona|villain|assistant |Elapsed" "$OUT/toy_cell.log" | tail -8
fi
