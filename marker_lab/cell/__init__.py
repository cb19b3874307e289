"""One cell's life, one module a step (read in this order):

- plan.py: every check and input, and the cell's identity (CellKey, config hash), before any model loads
  (preflight.py holds the checks);
- recipe.py: `run_cell`, the whole recipe: plan, train (`train_cell`), sample, write;
- sample.py: the sampled eval of trained cells on one engine (a cell's own: a group of one; a sweep's shared
  engine: cell/shared.py);
- finish.py: the one writer of run_result.json (provenance, timing) and of pending_eval.json;
- main.py: what Hydra runs (status record, signals, exit codes).
"""
