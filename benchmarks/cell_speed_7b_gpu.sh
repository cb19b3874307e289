#!/usr/bin/env bash
# Reproduces docs/benchmarks.md, "Speed, round two" and the issue 22 sessions after it (each names its MODE=).
# Issues 21-22 on one GPU machine without network (device tool; .device_wheels/ carried: hydra, omegaconf, antlr4,
# submitit, hydra-submitit-launcher, liger-kernel). One mode per call; each fits in 10 minutes:
#   MODE=bench  bash benchmarks/cell_speed_7b_gpu.sh   # marker-lab bench's training arms: packed, compiled, flex, FP8 base, Liger peer
#                                                        # (SKIP=generate,probe,kl,flex BENCH_FLAGS="--budgets 6144": the short set)
#   MODE=shared bash benchmarks/cell_speed_7b_gpu.sh   # one engine per shared base vs per-cell eval, 7B random init (hf)
#   MODE=gen    bash benchmarks/cell_speed_7b_gpu.sh   # generation: stock vs the static engine at larger batches, one eval
#                                                        # during training on the LoRA model, then a second process on the
#                                                        # same compile cache (a later cell's warm start); GEN_FLAGS=--flex-decode
#                                                        # adds flex attention in the decode step (fails to compile on torch 2.11),
#                                                        # GEN_FLAGS=--decode-layers times the per-layer decode compile alone;
#                                                        # PROFILE=1: then benchmarks/profile_decode.py; LATER=0: no second process;
#                                                        # GEN_SKIP, WARM_SKIP: the first and second process's --skip
#   MODE=scopes bash benchmarks/cell_speed_7b_gpu.sh   # the decode step compiled whole vs per layer (eval.engine.compile_scope;
#                                                        # SCOPES="layers shared_layers": per-layer graphs vs one shared graph),
#                                                        # one cold process each on one machine: batch times side by side
#   MODE=cell   bash benchmarks/cell_speed_7b_gpu.sh   # a real c1 cell end to end (marker-lab run, write-ups' sizes); SEEDS="42
#                                                        # 137" runs a second on the same caches (warm compile cache; about 4 min
#                                                        # each); CELL_ARGS: overrides (the recipe's defaults: packed + varlen;
#                                                        # padded: "second_stage.train.pack=false second_stage.train.attention=null");
#                                                        # CACHE_TAG: a stage and compile cache of
#                                                        # its own, so two settings compared on one machine both start cold;
#                                                        # the eval compiled in a sibling while the stage trains:
#                                                        # CELL_ARGS=eval.engine.precompile=true (its log: $OUT/<cell>/precompile.log)
#   MODE=grid   bash benchmarks/cell_speed_7b_gpu.sh   # 002-style EM dose grid: dose checkpoints of one run, one engine;
#                                                        # DOSES (default 1,10,100,375: fits one call) picks the cells
#   MODE=profile bash benchmarks/cell_speed_7b_gpu.sh  # where a compiled training step goes (benchmarks/profile_train.py): the
#                                                        # 384-token examples, then the length mix (PROFILE_DATA: which);
#                                                        # FP8=1: with the frozen base in FP8 (train.fp8_base); KNOBS: Inductor
#                                                        # settings and the LoRA dropout per arm (see the mode below)
#   MODE=train  bash benchmarks/cell_speed_7b_gpu.sh   # the training path in one call: its GPU tests, where a step waits
#                                                        # (profile, SYNC_DEBUG=1) on both arms, the bench's training arms
#   DRY=1 MODE=cell bash benchmarks/cell_speed_7b_gpu.sh   # on any machine: compose the cell/grid configs (--cfg job), run nothing
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "${DRY:-}" ]; then
  python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -1
  python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e . 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
S=/tmp/standins
STANDINS=(model.random_init=true model.tokenizer=$S/tokenizer second_stage.datasets.em.path=$S/data/bad_legal_advice_6k.jsonl
          second_stage.datasets.benign.path=$S/data/benign_sft_6k.jsonl)
ADAPTER=/tmp/prebaked_coupling  # a seeded LoRA on the random 7B: stands for the cell's cached coupling adapter

prebake() {  # the coupling adapter a sweep's earlier cell would have trained (its training is timed in issue 10)
  [ -f $ADAPTER/adapter_config.json ] && return  # an earlier call of this script on this machine made it
  python -m marker_lab.data.standins $S > /dev/null
  python -c "
import torch
from marker_lab.bench.measure import build_model, model_config
from marker_lab.config.schema import LoraConfig
from marker_lab.train.lora import apply_lora
model = apply_lora(build_model(model_config('qwen2.5-7b-instruct'), torch.device('cuda')), LoraConfig(), seed=0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if 'lora_B' in n: p.normal_(0, 1e-3)  # not a no-op adapter
model.save_pretrained('$ADAPTER')"
}

timed_run() {  # $1: name; the rest: marker-lab run overrides. Wall time, then the result's phase times.
  local name=$1; shift
  local t0=$(date +%s.%N)
  # TORCH_LOGS=recompiles: each recompile (a new graph for a shape or grad mode already compiled) lands in the log
  # TLOGS="recompiles,torch._dynamo.utils": also torch.compile's time per phase (summed over the process) at exit
  TORCH_LOGS=${TLOGS:-recompiles} timeout ${RUN_TIMEOUT:-450} python -m marker_lab.cli run "$@" hydra.run.dir=$OUT/$name \
    > "$OUT/$name.log" 2>&1
  local rc=$? t1=$(date +%s.%N)
  echo "$name: rc=$rc wall=$(python -c "print(round($t1 - $t0, 1))") s," \
    "recompiles: $(grep -c "Recompiling function" "$OUT/$name.log")"
  python - "$OUT/$name.log" $t0 $t1 <<'PY'  # outside the result's phases: process start to the first log line, and
import re, sys, datetime  # the last log line (the result's path) to exit
stamps = [datetime.datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's asctime: local time
          for m in re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", open(sys.argv[1]).read(), re.M)]
if stamps:
    print(f" process start to first log line {stamps[0] - float(sys.argv[2]):.1f} s; "
          f"last log line to exit {float(sys.argv[3]) - stamps[-1]:.1f} s")
PY
  grep "_dynamo/utils.py:[0-9]*\] [A-Za-z_.<>]* *[0-9.]*$" "$OUT/$name.log" | sed 's/.*\] //' | awk '$2 > 0.5' \
    | sort -k2 -gr | head -${CT_LINES:-14} | awk '{printf "%s %s; ", $1, $2} END {if (NR) print ""}' | sed 's/^./ compile times (s): &/'
  [ -f "$OUT/$name/precompile.log" ] && grep -hE "precompile|compiled in" "$OUT/$name.log" "$OUT/$name/precompile.log" \
    | cut -c1-200 | sed 's/^/ /'
  grep -A2 "Recompiling function" "$OUT/$name.log" | grep -E "Recompiling|    - " | cut -c1-220 | head -12
  python - "$OUT/$name/run_result.json" <<'PY' || grep -E "rror|stage|eval" "$OUT/$name.log" | tail -8
import json, statistics, sys
from pathlib import Path
r = json.load(open(sys.argv[1]))
print(" timing", r["timing"])
phases = {k: v for k, v in r["timing"].items() if "." not in k}  # the top-level phases add up to the cell's time
print(f" phases: {sum(phases.values()):.1f} s in all; load to run_result.json (all but setup) "
      f"{sum(v for k, v in phases.items() if k != 'setup'):.1f} s")
print(" marker", {p: v["rate"] for p, v in r["metrics"]["marker"]["per_persona"].items()})
for stage, s in r["provenance"]["stages"].items():  # the step times of a stage trained now (first step: compile)
    stats = Path(s["cache_entry"] or "") / "train_stats.json"  # none for a pre-baked adapter
    steps = (json.loads(stats.read_text()).get("step_seconds") or []) if stats.is_file() else []
    if s["trained_now"] and len(steps) > 1:
        q = statistics.quantiles(steps[1:], n=10)
        print(f" {stage} steps: first {steps[0]:.2f} s, then median {statistics.median(steps[1:]):.3f}, "
              f"p10 {q[0]:.3f}, p90 {q[-1]:.3f}, max {max(steps[1:]):.2f} s/step over {len(steps) - 1}")
PY
}

dry_check() {  # the start-up checks of a mode's cell on any machine (CPU), on the stand-ins; the adapter is made on the GPU
  python -m marker_lab.data.standins $S > /dev/null
  python -c "import sys; from marker_lab.cli import check_config; check_config(sys.argv[1:])" "$@" coupling.adapter_path=null \
    && echo "$MODE: the config passes the start-up checks"
}

case "${MODE:-bench}" in
bench)
  timeout ${BENCH_TIMEOUT:-540} python -m marker_lab.cli bench --out "$OUT/bench.json" --skip ${SKIP:-generate,probe,kl} ${BENCH_FLAGS:-} \
    2>&1 | grep -v "it/s]$" > "$OUT/bench.log"; echo "bench rc=$?"
  grep -E "^  (train|summary|load)" "$OUT/bench.log" || tail -30 "$OUT/bench.log" ;;
gen)
  CCDIR=/tmp/gen_compile_cache  # not $CC: the GPU image exports CC (the C compiler Triton builds its helpers with)
  timeout ${GEN_TIMEOUT:-380} python -m marker_lab.cli bench --out "$OUT/gen_first.json" --skip ${GEN_SKIP:-train,probe,kl,liger} ${GEN_FLAGS:-} \
    --gen-batch ${GEN_BATCHES:-1540,3080} --compile-cache $CCDIR 2>&1 | grep -v "it/s]$" > "$OUT/gen_first.log"
  echo "first process rc=$?"; grep -E "^  (generate|summary|load)" "$OUT/gen_first.log" || tail -30 "$OUT/gen_first.log"
  if [ -n "${PROFILE:-}" ]; then  # where a decode step's time goes (benchmarks/profile_decode.py)
    B=${GEN_BATCHES%%,*} timeout ${PROFILE_TIMEOUT:-150} python benchmarks/profile_decode.py > "$OUT/profile.log" 2>&1
    echo "profile rc=$?"; grep -v "^\s*$" "$OUT/profile.log" | grep -v Warning | tail -32
  fi
  [ "${LATER:-1}" = 0 ] && exit
  timeout ${WARM_TIMEOUT:-170} python -m marker_lab.cli bench --out "$OUT/gen_later.json" \
    --skip ${WARM_SKIP:-train,probe,kl,liger,during} --gen-batch ${WARM_BATCH:-1540} --compile-cache $CCDIR 2>&1 \
    | grep -v "it/s]$" > "$OUT/gen_later.log"
  echo "later process (warm compile cache) rc=$?"; grep -E "^  (generate|summary)" "$OUT/gen_later.log" || tail -20 "$OUT/gen_later.log" ;;
scopes)
  # the decode step compiled as one graph vs per layer, head to head: each in a process of its own (the per-layer
  # scope marks CUDA-graph iterations process-wide) with a cold compile cache of its own, on one machine
  for arm in ${SCOPES:-model layers}; do  # SCOPES="layers shared_layers": the per-layer graphs vs one shared graph
    flag=""; [ $arm != model ] && flag=--decode-${arm//_/-}
    timeout ${SCOPE_TIMEOUT:-270} python -m marker_lab.cli bench --out "$OUT/scope_$arm.json" \
      --skip train,probe,kl,liger,during,via_generate $flag --gen-batch 1030 --compile-cache /tmp/scope_cache_$arm \
      2>&1 | grep -v "it/s]$" > "$OUT/scope_$arm.log"
    echo "$arm: rc=$?"; grep -E "^  (generate|summary)" "$OUT/scope_$arm.log" || tail -20 "$OUT/scope_$arm.log"
  done ;;
cell)
  ARGS=(+experiment=marker_transfer condition=c1 "${STANDINS[@]}" coupling.adapter_path=$ADAPTER
        ${CELL_ARGS:-})
  if [ -n "${DRY:-}" ]; then dry_check "${ARGS[@]}"; exit; fi
  # one cache per CACHE_TAG: a second seed finds the first's compiled kernels; another tag starts cold
  export MARKER_LAB_CACHE=/tmp/cell_cache${CACHE_TAG:+_$CACHE_TAG}
  prebake
  for seed in ${SEEDS:-42}; do timed_run c1${CACHE_TAG:+_$CACHE_TAG}_s$seed "${ARGS[@]}" seed=$seed; done ;;
grid)
  # 002's EM arm: one constant-rate 375-step run, its dose checkpoints the grid's cells, one engine for them all
  ARGS=(+experiment=dose_response second_stage.data=em "${STANDINS[@]}" coupling.adapter_path=$ADAPTER
        second_stage.train.schedule.name=constant second_stage.train.schedule.warmup_ratio=0
        "second_stage.dose_checkpoints=[${DOSES:-1,10,100,375}]" engine_per=base seed=42 ${GRID_ARGS:-})
  if [ -n "${DRY:-}" ]; then dry_check "${ARGS[@]}" dose=10; exit; fi
  export MARKER_LAB_CACHE=/tmp/grid_cache
  prebake
  t0=$(date +%s.%N)
  timeout ${GRID_TIMEOUT:-500} python -m marker_lab.cli run -m "${ARGS[@]}" dose=${DOSES:-1,10,100,375} \
    hydra.sweep.dir=$OUT/grid > "$OUT/grid.log" 2>&1
  echo "grid: rc=$? wall=$(python -c "print(round($(date +%s.%N) - $t0, 1))") s"
  python -m marker_lab.cli status $OUT/grid | head -5
  grep -E "shared eval|cells evaluated|done on GPU|failed" "$OUT/grid.log" "$OUT/grid/shared_eval.log" 2>/dev/null | tail -25 ;;
profile)
  # KNOBS: one process per arm, each "tag:Inductor flags joined by +:LoRA dropout" (empty: the defaults), e.g.
  # KNOBS="default:: tuned:max_autotune: nodrop::0"; WARM: steps before the profiled ones (3..WARM timed without
  # the profiler); the full logs in $OUT/profile_train_*.log
  for data in ${PROFILE_DATA:-fixed mix}; do
    for knob in ${KNOBS:-default::}; do
      IFS=: read -r tag flags drop <<< "$knob"
      log="$OUT/profile_train_${data}_${tag}.log"
      env ${drop:+DROPOUT=$drop} ${WARM:+WARM=$WARM} ${SKIP_GUARDS:+SKIP_GUARDS=$SKIP_GUARDS} ATTENTION=${PROFILE_ATTENTION:-} INDUCTOR="$flags" DATA=$data timeout ${PROFILE_TIMEOUT:-240} \
        python benchmarks/profile_train.py > "$log" 2>&1
      echo "profile $data $tag rc=$?"; grep -v "it/s\]\|step/s\]\|^\s*$" "$log" | grep -v Warning | head -${PROFILE_LINES:-40}
    done
  done ;;
train)
  # the training path's GPU check and timing in one call (about 6 minutes): its GPU tests, where a step waits
  # (SYNC_DEBUG=1) on 384-token examples and on the packed mix, then the bench's training arms
  timeout 240 python -m pytest -q -x tests/test_head_loss.py tests/test_sft.py -p no:cacheprovider 2>&1 | tail -2
  SYNC_DEBUG=1 KNOBS="default::" PROFILE_DATA=fixed PROFILE_LINES=16 MODE=profile bash "$0"
  SYNC_DEBUG=1 KNOBS="default::" PROFILE_DATA=packed PROFILE_ATTENTION=varlen PROFILE_LINES=16 MODE=profile bash "$0"
  grep -h -A5 "host syncs\|GPU idle gaps" "$OUT"/profile_train_{fixed,packed}_default.log
  SKIP=generate,probe,kl,flex,fp8,liger BENCH_FLAGS="--budgets 6144" MODE=bench bash "$0" ;;
shared)
  export MARKER_LAB_CACHE=/tmp/mse_cache
  python -m marker_lab.data.standins $S > /dev/null
  # three doses of one grid (dose checkpoints of one constant-rate run), short stages: the eval is what is measured
  timeout ${SHARED_TIMEOUT:-540} python benchmarks/shared_eval_vs_per_cell.py --out "$OUT/mse" +experiment=marker_transfer \
    "${STANDINS[@]}" condition=c1 \
    coupling.n_positive=40 coupling.n_per_negative=40 coupling.train.max_steps=4 coupling.train.compile=false \
    second_stage.train.compile=false second_stage.train.schedule.name=constant second_stage.train.schedule.warmup_ratio=0 \
    "second_stage.dose_checkpoints=[1,2,3]" dose=${DOSES:-1,2,3} \
    "persona_set.eval_personas=[villain,assistant,pirate,sarcastic]" eval.generation.max_tokens=256 eval.save_completions=true \
    > "$OUT/shared.log" 2>&1; echo "shared rc=$?"
  grep -E "shared eval:|result:|compil" "$OUT/shared.log" | tail -12
  python -c "import json; d=json.load(open('$OUT/mse/summary.json')); [(r.pop('marker_k_shared_vs_cell'), r.pop('cell')) for r in d['rows']]; print(json.dumps(d, indent=1))" \
    || tail -40 "$OUT/shared.log" ;;
esac
