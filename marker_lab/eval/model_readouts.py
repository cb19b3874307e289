"""Readouts taken from every model of a cell as the cell reaches it (base, then after each stage): persona
geometry (geometry.enabled, and its drift over the cell's models) and the metrics that read every model (the
latent probe: `probe` in eval.metrics; any metric registered with reads=every_model).
"""

from __future__ import annotations

from pathlib import Path

from marker_lab.core.files import atomic_write_bytes, md5_file
from marker_lab.eval.geometry import cell_distances, drift_summary
from marker_lab.eval.metrics import METRICS, Reads, metrics_reading


DISTANCES_FILE = "persona_distances.csv"  # the cell's persona cosine-distance matrix, next to its result


class ModelReadouts:
    """Call `read(name, loaded)` on each model of the cell, in order; then `metric_results()` and `finish(out_dir)`."""

    def __init__(self, cfg, inputs, cache):
        self.cfg, self.inputs, self.cache = cfg, inputs, cache
        g = cfg.geometry
        self.drift = g.enabled and g.drift
        self.geometry_models: dict[str, dict] = {}  # model name -> its distance matrix's cache entry
        # each metric that reads every model: its reader (read(name, loaded), result(), seconds, files_md5())
        self.readers = {m: METRICS.get(m).compute(cfg, inputs, cache)
                        for m in metrics_reading(cfg.eval.metrics, Reads.every_model)}
        self._last = None  # the last model read (geometry.model=final reads it once at the end)

    @property
    def active(self) -> bool:
        """Whether the cell takes any readout (else every call here is a no-op)."""
        return self.cfg.geometry.enabled or bool(self.readers)

    def read(self, name: str, loaded) -> None:
        g = self.cfg.geometry
        if g.enabled and (self.drift or (name == "base" and g.model == "base")):
            self.geometry_models[name] = cell_distances(self.cfg, self.inputs, loaded, self.cache)
        for reader in self.readers.values():
            reader.read(name, loaded)
        self._last = loaded

    def metric_results(self) -> dict[str, tuple[dict, float]]:
        """Each every-model metric's result and the seconds it took over the cell."""
        return {name: (reader.result(), reader.seconds) for name, reader in self.readers.items()}

    def finish(self, out_dir: Path, data_md5: dict) -> dict:
        """The cell's geometry (and drift), their matrices saved next to the result, and the every-model metrics' file
        checksums in `data_md5` (the fitted probe's files); returns the result's fields."""
        g, out = self.cfg.geometry, {}
        for name, reader in self.readers.items():
            data_md5.update({f"{name}/{k}": v for k, v in reader.files_md5().items()})
        if not g.enabled:
            return out
        if g.model == "base":
            geometry = self.geometry_models["base"]
        else:
            geometry = list(self.geometry_models.values())[-1] if self.drift else \
                cell_distances(self.cfg, self.inputs, self._last, self.cache)
        atomic_write_bytes(out_dir / DISTANCES_FILE, (Path(geometry["cache_entry"]) / "distances.csv").read_bytes())
        data_md5["persona_distances"] = md5_file(out_dir / DISTANCES_FILE)
        out["geometry"] = {**geometry, "model": g.model, "file": DISTANCES_FILE}
        if self.drift:
            out["drift"] = self._drift(out_dir, data_md5)
        return out

    def _drift(self, out_dir: Path, data_md5: dict) -> dict:
        """Each model's distance matrix next to the result (persona_distances_<model>.csv) and its drift summary,
        with the change from the base model."""
        names = list(self.inputs.personas)
        out = {}
        for model, info in self.geometry_models.items():
            file = f"persona_distances_{model}.csv"
            atomic_write_bytes(out_dir / file, (Path(info["cache_entry"]) / "distances.csv").read_bytes())
            data_md5[file] = md5_file(out_dir / file)
            out[model] = {"file": file, "cache_key": info["cache_key"],
                          **drift_summary(info["cache_entry"], names, self.cfg.source_persona,
                                          self.cfg.persona_set.assistant)}
        for summary in out.values():
            for k in ("mean_distance", "relative_spread", "source_assistant"):
                if k in summary:
                    summary[f"{k}_change"] = summary[k] - out["base"][k]
        return out
