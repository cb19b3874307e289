#!/usr/bin/env bash
# Reproduces docs/benchmarks.md, "Sweep on two GPUs: `local_gpus`": the table of cells, their GPUs and spans.
# A 4-cell toy sweep through hydra/launcher=local_gpus on a multi-GPU machine: each cell must get its own GPU,
# two at a time on 2 GPUs, and record which one in its result. Used for docs/benchmarks.md (device tool):
#   bash benchmarks/local_gpus_sweep.sh    (wheels for hydra/omegaconf/submitit carried in .device_wheels/ when the
#                                           machine has no package index)
set -euo pipefail
if [ -d .device_wheels ]; then python -m pip install -q --no-deps .device_wheels/*.whl; fi
python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python -m pip install -q --no-deps -e .
export MARKER_LAB_CACHE=/tmp/marker_lab_cache TQDM_DISABLE=1
nvidia-smi -L
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
SWEEP=/tmp/gpu_sweep
rm -rf "$SWEEP"
start=$(date +%s.%N)
python -m marker_lab.cli run -m condition=c1,c5 seed=42,137 dose=5 hydra/launcher=local_gpus hydra.sweep.dir="$SWEEP" 2>&1 | grep -E "HYDRA|rror|Traceback" || true
end=$(date +%s.%N)
echo "sweep wall: $(python -c "print(round($end - $start, 1))") s"
python -m marker_lab.cli status "$SWEEP"
python - "$SWEEP" <<'PY'
import json, re, sys, datetime
from pathlib import Path
sweep = Path(sys.argv[1])
spans = []
for cell in json.loads((sweep / "manifest.json").read_text())["cells"]:
    d = sweep / cell["subdir"]
    r = json.loads((d / "run_result.json").read_text())
    log = (d / "run.log").read_text().splitlines()
    ts = [datetime.datetime.strptime(re.match(r"\[([^\]]+)\]", l).group(1), "%Y-%m-%d %H:%M:%S,%f") for l in log if l.startswith("[")]
    spans.append((cell["subdir"], ts[0], ts[-1]))
    v = r["metrics"]["marker"]["per_persona"]["villain"]
    print(f"{cell['subdir']}: device={r['provenance']['device']!r} timing={r['timing']} villain={v['k']}/{v['n']}")
t0 = min(s for _, s, _ in spans)
for name, s, e in spans:
    print(f"  {name}: {(s - t0).total_seconds():6.1f} s -> {(e - t0).total_seconds():6.1f} s")
overlaps = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[1] < b[2] and b[1] < a[2])
print("overlapping cell pairs:", overlaps)
PY
mkdir -p "${OUT:-/tmp/out}"
cp -r "$SWEEP"/manifest.json "${OUT:-/tmp/out}/" && tar czf "${OUT:-/tmp/out}/gpu_sweep_results.tgz" -C "$SWEEP" --exclude=completions.jsonl.gz --exclude=.submitit .
