"""The benchmarks that ship with the package: `marker-lab bench` (run.py; its measurements in measure.py, its arms in
arms.py, its workload in workload.py, its report in report.py) and the aggregation timed on a large sweep
(`python -m marker_lab.bench.aggregate`). The scripts that reproduce other figures of docs/benchmarks.md are in the
repository's benchmarks/ folder."""
