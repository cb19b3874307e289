"""Readouts taken from every model of a cell as the cell reaches it (base, then after each stage): persona
geometry (geometry.enabled, and its drift over the cell's models) and the latent probe (`probe` in eval.metrics).
"""

from __future__ import annotations

from pathlib import Path

from marker_lab.core.files import atomic_write_bytes, md5_file
from marker_lab.eval.geometry import cell_distances, drift_summary
from marker_lab.eval.probe import CellProbe


DISTANCES_FILE = "persona_distances.csv"  # the cell's persona cosine-distance matrix, next to its result


class ModelReadouts:
    """Call `read(name, loaded)` on each model of the cell, in order; then `probe_result()` and `finish(out_dir)`."""

    def __init__(self, cfg, inputs, cache):
        self.cfg, self.inputs, self.cache = cfg, inputs, cache
        g = cfg.geometry
        self.drift = g.enabled and g.drift
        self.geometry_models: dict[str, dict] = {}  # model name -> its distance matrix's cache entry
        self.probe = CellProbe(cfg, inputs, cache) if "probe" in cfg.eval.metrics else None
        self._last = None  # the last model read (geometry.model=final reads it once at the end)

    @property
    def active(self) -> bool:
        """Whether the cell takes any readout (else every call here is a no-op)."""
        return self.cfg.geometry.enabled or self.probe is not None

    def read(self, name: str, loaded) -> None:
        g = self.cfg.geometry
        if g.enabled and (self.drift or (name == "base" and g.model == "base")):
            self.geometry_models[name] = cell_distances(self.cfg, self.inputs, loaded, self.cache)
        if self.probe:
            self.probe.read(name, loaded)
        self._last = loaded

    def probe_result(self) -> tuple[dict, float] | None:
        """The probe's metric and the seconds it took over the cell (None without a probe)."""
        if not self.probe:
            return None
        return self.probe.result(), self.probe.seconds

    def finish(self, out_dir: Path, data_md5: dict) -> dict:
        """The cell's geometry (and drift), their matrices saved next to the result, and the probe's file checksums in
        `data_md5`; returns the result's fields."""
        g, out = self.cfg.geometry, {}
        if self.probe:  # the fitted probe's files, by checksum
            data_md5.update({f"probe/{k}": v for k, v in self.probe.fit["md5"].items()})
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
