"""Results: the per-cell contract, and a sweep's results as tables (`load_sweep`) for notebooks."""


def load_sweep(path):
    """A sweep's complete results: one row per (cell, persona, metric) with k, n, rate (a pandas DataFrame)."""
    from marker_lab.results.aggregate import load_sweep as _load_sweep

    return _load_sweep(path)


__all__ = ["load_sweep"]
