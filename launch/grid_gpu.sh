#!/usr/bin/env bash
# Issue 10: 000's 13-cell marker-transfer grid, Qwen2.5-7B shape with random weights, offline stand-ins for the
# tokenizer and the EM / benign files (marker_lab/data/standins.py), through local_gpus on every GPU here.
# Writes $OUT/grid_report.json (wall, per-cell spans and GPUs, busy fraction, aggregation time) and the logs.
#   bash launch/grid_gpu.sh                         # the whole grid (device tool, .device_wheels carried)
#   bash launch/grid_gpu.sh condition=c2 seed=42    # any overrides narrow it (one cell here)
#   KILL_AFTER=600 bash launch/grid_gpu.sh          # kill -9 one running cell after 600 s, rerun, report both runs
#   SWEEP_TIMEOUT=500 bash launch/grid_gpu.sh ...   # stop the sweep after 500 s and still write the report
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .device_wheels ]; then python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -1; fi
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e . 2>&1 | tail -1
export MARKER_LAB_CACHE=/tmp/grid_cache TQDM_MININTERVAL=30  # progress lines every 30 s in the cell logs
nvidia-smi -L
# GPUs the launcher uses: CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists (MIG lines left out)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU"); fi
[ "$NGPU" -gt 0 ] || NGPU=1
S=/tmp/standins; SWEEP=$OUT/grid  # under $OUT: the cells' logs come back even when a time limit cuts the run
python -m marker_lab.data.standins $S > "$OUT/standins.json"
ARGS=(+experiment=marker_transfer hydra/launcher=local_gpus model.random_init=true model.tokenizer=$S/tokenizer
      second_stage.datasets.em.path=$S/data/bad_legal_advice_6k.jsonl
      second_stage.datasets.benign.path=$S/data/benign_sft_6k.jsonl hydra.sweep.dir=$SWEEP
      # the stand-in settings are the same for every cell: keep them out of the cell directories' names
      "hydra.job.config.override_dirname.exclude_keys=[experiment,hydra.launcher.gpus,hydra.launcher.max_parallel,hydra.sweep.dir,extra.phase_dir,model.random_init,model.tokenizer,second_stage.datasets.em.path,second_stage.datasets.benign.path]"
      "$@")
run_grid() {  # $1: log name; times the sweep (cells, then the dependent aggregation it runs at the end)
  local t0=$(date +%s.%N)
  timeout "${SWEEP_TIMEOUT:-86400}" python -m marker_lab.cli run -m "${ARGS[@]}" > "$OUT/$1.log" 2>&1; local rc=$?
  local t1=$(date +%s.%N)
  echo "$1: rc=$rc wall=$(python -c "print(round($t1 - $t0, 1))") s"
  local a0=$(date +%s.%N); python -m marker_lab.cli aggregate $SWEEP > "$OUT/$1_aggregate.log" 2>&1; local a1=$(date +%s.%N)
  python launch/grid_report.py "$OUT/$1.log" $SWEEP "$NGPU" "$(python -c "print(round($t1 - $t0, 1))")" \
    "$(python -c "print(round($a1 - $a0, 1))")" > "$OUT/$1_report.json"; cat "$OUT/$1_report.json" | head -60
  grep -E "HYDRA|rror" "$OUT/$1.log" | tail -20
}
if [ -n "${KILL_AFTER:-}" ]; then
  # a cell is a `python -m submitit.core._submit <folder>` process under its submitit controller
  ( sleep "$KILL_AFTER"; pid=$(pgrep -f "submitit.core._submit" | head -1)
    if [ -n "$pid" ]; then echo "kill -9 $pid: $(tr '\0' ' ' < /proc/$pid/cmdline)" > "$OUT/killed.txt"; kill -9 "$pid"
    else echo "no cell was running after $KILL_AFTER s" > "$OUT/killed.txt"; fi ) &
  run_grid grid_killed
  run_grid grid_rerun
else
  run_grid grid
fi
python -m marker_lab.cli status $SWEEP | tail -20
mkdir -p "$OUT/cell_logs"  # plain names (cell directory names do not come back from the device tool)
for d in $SWEEP/.submitit/*/; do i=$(basename "$d"); cat "$d"/*_log.err > "$OUT/cell_logs/$i.err" 2>/dev/null; done
python - "$SWEEP" "$OUT/cell_logs" <<'PY'
import json, shutil, sys
from pathlib import Path
sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
for c in json.loads((sweep / "manifest.json").read_text())["cells"]:
    if (sweep / c["subdir"] / "run.log").is_file():
        shutil.copy(sweep / c["subdir"] / "run.log", out / f"{c['index']}.log")
PY
find $SWEEP -name completions.jsonl.gz -delete; rm -rf $SWEEP/.submitit  # keep what comes back small
