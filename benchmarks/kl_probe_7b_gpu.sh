#!/usr/bin/env bash
# Reproduces docs/benchmarks.md, "Issue 9 on an H100": the KL-to-input arm, the probe's feature read, GPU tests.
# Issue 9 on a GPU (device tool; .device_wheels/ carried): the GPU tests, the 7B-shape bench with the KL-to-input
# arm and the probe's feature read, and toy cells with the probe and with kl_to_input on CUDA.
set -uo pipefail
python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -1
python -c "import sklearn, scipy; print('sklearn', sklearn.__version__, 'scipy', scipy.__version__)" 2>&1 | tail -1
export MARKER_LAB_CACHE=/tmp/ml_cache
timeout 240 python -m pytest -q -x tests/test_bench.py tests/test_engines.py tests/test_sft.py -p no:cacheprovider 2>&1 | tail -4
timeout 300 python -m marker_lab.cli bench --skip generate,compile --budgets 6144 --out $OUT/bench_kl.json 2>&1 | grep -v "it/s\]" | tail -14
for args in "eval.probe.target=marker" "second_stage.train.kl_to_input=1.0 eval.probe.target=source"; do
  timeout 150 python -m marker_lab.cli run hydra.run.dir=$OUT/toy_cell condition=c1 dose=10 "eval.metrics=[marker,probe]" $args > $OUT/toy_cell.log 2>&1
  echo "toy c1 ($args) rc=$?"; grep -E "probe: |villain   |result:|Error" $OUT/toy_cell.log | tail -6
  python -c "import json; r=json.load(open('$OUT/toy_cell/run_result.json')); p=r['metrics']['probe']['models']; print(r['provenance']['device'], r['timing'], {m: round(x['per_persona']['villain']['mean_score'], 3) for m, x in p.items()})"
done
