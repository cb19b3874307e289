#!/usr/bin/env bash
# The GPU-relevant tests and a toy cell with compiled coupling, on a GPU machine (device tool; .device_wheels/ carried).
set -uo pipefail
python -m pip install -q --no-deps .device_wheels/*.whl 2>&1 | tail -1
export MARKER_LAB_CACHE=/tmp/ml_cache
timeout 300 python -m pytest -q -x tests/test_bench.py tests/test_engines.py tests/test_sft.py -p no:cacheprovider 2>&1 | tail -5
# evals during training on the compiled static engine, on the training LoRA model (issue 22)
timeout 300 python -m pytest -q -x tests/test_behaviour.py -k cells_engine -p no:cacheprovider 2>&1 | tail -5
timeout 200 python -m marker_lab.cli run hydra.run.dir=$OUT/toy_c4 condition=c4 coupling.train.compile=true > $OUT/toy_c4.log 2>&1; echo "toy c4 compiled rc=$?"
grep -E "stage coupling: training|villain|assistant  |result:" $OUT/toy_c4.log | tail -5
