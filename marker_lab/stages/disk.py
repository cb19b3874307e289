"""Disk space before expensive work: what a cell will write, estimated from its config and the model's shape, checked
against the free space of the file systems it writes to before the model loads.

The estimate is an upper bound: every stage is counted as if it trained now (a cached stage writes nothing), each
LoRA adapter at 4 bytes per parameter (peft keeps adapters in float32) with one copy per dose checkpoint, the
coupling's generated data at 2 KB an example, a GGUF model's conversion at its dequantized size, and vLLM's merged
model (written next to the result) at the model's size. A write that fails anyway is one line naming the directory
(core/cache.py removes the entry's temporary directory).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from marker_lab.engines import ENGINES
from marker_lab.config.schema import Config, coupling_enabled, second_stage_enabled
from marker_lab.core.errors import DiskFullError
from marker_lab.core.files import resolve_path
from marker_lab.stages.checks import coupling_examples

ADAPTER_BYTES = 4  # peft keeps LoRA weights in float32
EXAMPLE_BYTES = 2048  # a generated coupling example on disk (jsonl), generously
MARGIN = 1.1  # 10% over the estimate, and at least SLACK more
SLACK = 64 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    """What the estimate needs of a decoder-only transformer (Llama / Qwen2 style names)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, c: dict) -> "Shape | None":
        """From a config.json's fields (a multimodal model's `text_config`; GPT-2's n_layer / n_embd names); None
        when it names no layers or width (the estimate then goes without adapters)."""
        c = c.get("text_config") or c
        layers = c.get("num_hidden_layers") or c.get("n_layer")
        hidden = c.get("hidden_size") or c.get("n_embd")
        if not layers or not hidden:
            return None
        heads = c.get("num_attention_heads") or c.get("n_head") or 1
        return cls(layers, hidden, c.get("intermediate_size") or c.get("n_inner") or 4 * hidden, heads,
                   c.get("num_key_value_heads") or heads, c.get("head_dim") or hidden // heads, c.get("vocab_size", 0))

    def linear(self, name: str) -> tuple[int, int]:
        """(in, out) features of a target module by its usual name; an unknown name counts as hidden x hidden."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)
                }.get(name, (self.hidden, self.hidden))

    def parameters(self) -> int:
        """The model's parameters, roughly (embeddings and head counted twice, as untied models have them)."""
        per_layer = sum(i * o for i, o in map(self.linear, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj")))
        return self.layers * per_layer + 2 * self.vocab * self.hidden


@dataclass
class Writes:
    """Bytes a cell may write, by file system root it writes under."""
    by_dir: dict[str, int] = field(default_factory=dict)  # directory -> bytes
    parts: list[str] = field(default_factory=list)  # what makes up the estimate, for messages

    def add(self, directory: str, what: str, n: int) -> None:
        self.by_dir[directory] = self.by_dir.get(directory, 0) + n
        self.parts.append(f"{what} {_mb(n)}")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def model_shape(cfg: Config) -> Shape | None:
    """The model's shape from its config.json (toy: its settings), without loading weights; None if unknown."""
    m = cfg.model
    if m.source == "toy":
        t = m.toy
        return Shape(t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads,
                     t.hidden_size // t.num_heads, t.vocab_size)
    candidates = []
    if m.arch:
        candidates.append(resolve_path(m.arch))
    if m.path:
        try:
            candidates.append(resolve_path(m.path) / "config.json")
        except FileNotFoundError:
            pass
    for path in candidates:
        if path.is_file():
            try:
                return Shape.from_config(json.loads(path.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):  # not a config we can read
                return None
    if m.source == "hf" and m.path:  # a Hub id: its config from the local Hub cache, if it is there
        try:
            from transformers import AutoConfig

            return Shape.from_config(AutoConfig.from_pretrained(m.path, revision=m.revision).to_dict())
        except Exception:  # noqa: BLE001 - not cached, offline: the estimate goes without the model's shape
            return None
    return None


def estimate_writes(cfg: Config) -> Writes:
    """What the cell may write (see the module docstring)."""
    w = Writes()
    shape = model_shape(cfg)
    trains_coupling = coupling_enabled(cfg) and not cfg.coupling.adapter_path
    stages = [("coupling", cfg.coupling)] if trains_coupling else []
    if second_stage_enabled(cfg):
        stages.append(("second_stage", cfg.second_stage))
    for name, stage in stages:
        lora = stage.train.lora
        if shape is not None and lora is not None:
            params = shape.layers * sum(lora.r * sum(shape.linear(t)) for t in lora.target_modules)
            copies = 1 + len(getattr(stage, "dose_checkpoints", None) or [])
            w.add(cfg.cache_dir, f"{name} adapter{'s' if copies > 1 else ''}", params * ADAPTER_BYTES * copies)
    if trains_coupling:
        w.add(cfg.cache_dir, "coupling data", coupling_examples(cfg.coupling) * EXAMPLE_BYTES)
    if cfg.model.source == "gguf":
        file = resolve_path(cfg.model.path) / cfg.model.gguf_file
        if shape is not None:
            size = shape.parameters() * DTYPE_BYTES[str(cfg.model.dtype)]
        else:  # the dequantized weights are at most 4 bytes a parameter; a quantized file holds >= 0.5 per parameter
            size = file.stat().st_size * 8
        w.add(cfg.cache_dir, "GGUF conversion (once per file)", size)
    if ENGINES.get(cfg.eval.engine.name).saves_model and shape is not None:
        w.add(cfg.output_dir, f"the merged model {cfg.eval.engine.name} serves", shape.parameters() * DTYPE_BYTES[str(cfg.model.dtype)])
    return w


def free_bytes(directory: str) -> tuple[Path, int]:
    """The free space of the file system `directory` is (or will be) on, and the directory that answered."""
    path = Path(directory).expanduser().absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    return existing, shutil.disk_usage(existing).free


def check_disk(cfg: Config) -> Writes:
    """Stop before the model loads when a directory the cell writes to has less free space than its estimate."""
    writes = estimate_writes(cfg)
    for directory, need in writes.by_dir.items():
        need = int(need * MARGIN) + SLACK
        where, free = free_bytes(directory)
        if free < need:
            key = "cache_dir" if directory == cfg.cache_dir else "output_dir"
            raise DiskFullError(f"{key}={directory}: about {_mb(need)} needed ({', '.join(writes.parts)}, with a "
                                f"margin), {_mb(free)} free on the file system of {where}; free some space or point "
                                f"{key} elsewhere")
    return writes
