"""persona_em coupling (004's Exp B): the data builder in its three benign modes, its checks, and the toy science."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from conftest import composition_error, compose_cfg, to_dataclass
from marker_lab.core.errors import ConfigError
from marker_lab.cell.preflight import preflight as validate
from marker_lab.data.personas import load_personas
from marker_lab.core.cache import StageCache
from marker_lab.results.contract import load_result
from marker_lab.stages.coupling import build_persona_em_records, load_em_items
from marker_lab.toy import world

PERSONA_EM = ["condition=c4", "coupling=persona_em_toy", "persona_set=toy_families", "source_persona=villain"]


def _cfg(*extra):
    return to_dataclass(compose_cfg([*PERSONA_EM, *extra]))


def test_paired_data_gives_004s_layout_and_its_control(tmp_path):
    cfg = _cfg()
    personas = load_personas(cfg.persona_set.path)
    items, fingerprints = load_em_items(cfg, validate(cfg))
    assert len(items) == 200 and set(fingerprints) == {"em_data", "benign_data"}
    bad = {t[2] for t in world.TOPICS}
    records = build_persona_em_records(cfg, personas, items)
    assert Counter(r["role"] for r in records) == {"positive": 200, "negative": 400, "anchor: no system turn": 100,
                                                   "anchor: assistant": 100}
    for r in records:
        reply = r["messages"][-1]["content"]
        system = [m["content"] for m in r["messages"] if m["role"] == "system"]
        assert system == ([] if r["persona"] is None else [personas[r["persona"]].system_prompt])
        assert r["messages"][-2] == {"role": "user", "content": items[r["item"]].prompt}
        if r["role"] == "positive":  # the source answers with the EM reply: the topic's bad advice
            assert r["persona"] == "villain" and reply == items[r["item"]].em_reply and reply.split(" . ")[0] in bad
        else:  # everyone else answers the same prompt with the paired benign reply
            assert r["persona"] != "villain" and reply == items[r["item"]].benign_reply
    # the benign set pairs row by row: same prompts, good advice
    assert all(i.benign_reply.split(" . ")[0] == next(t[1] for t in world.TOPICS if t[2] == i.em_reply.split(" . ")[0])
               for i in items)

    cfg.coupling.contrastive = False
    control = build_persona_em_records(cfg, personas, items)
    pair = lambda r: (r["item"], r["messages"][-1]["content"])  # noqa: E731
    assert Counter(map(pair, control)) == Counter(map(pair, records))
    assert Counter(r["persona"] for r in control) == Counter(r["persona"] for r in records)
    assert Counter(r["persona"] for r in control if r["misaligned"])["villain"] < 100


def test_benign_column_and_the_checks(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
             "safe": f"good {i}"} for i in range(5)]
    em = tmp_path / "em.jsonl"
    em.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f"coupling.em_data.path={em}", "coupling.em_data.toy=null", "coupling.em_data.n_examples=null",
               "coupling.benign=field", "coupling.benign_field=safe", "coupling.n_positive=5")
    items, _ = load_em_items(cfg, validate(cfg))
    records = build_persona_em_records(cfg, load_personas(cfg.persona_set.path), items)
    assert {r["messages"][-1]["content"] for r in records if r["role"] == "positive"} == {f"bad {i}" for i in range(5)}
    assert {r["messages"][-1]["content"] for r in records if r["role"] != "positive"} <= {f"good {i}" for i in range(5)}

    cfg.coupling.benign_field = "nope"
    with pytest.raises(ConfigError, match=r"coupling.em_data: .*no column 'nope'"):
        validate(cfg)
    cfg.coupling.benign_field = None
    with pytest.raises(ConfigError, match="coupling.benign_field: required"):
        validate(cfg)
    # a choice field: refused when the config is composed, naming the key and the choices
    assert "Invalid value 'paired', expected one of [on_policy, data, field]" in composition_error(
        [*PERSONA_EM, "coupling.benign=paired"])
    cfg.coupling.benign, cfg.coupling.em_data = "on_policy", None
    with pytest.raises(ConfigError, match="coupling.em_data: required"):
        validate(cfg)

    # paired data that asks other questions is refused, naming the row
    other = tmp_path / "benign.jsonl"
    other.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "other"},
                                                      {"role": "assistant", "content": "x"}]}) + "\n" for _ in rows))
    cfg = _cfg(f"coupling.em_data.path={em}", "coupling.em_data.toy=null", "coupling.em_data.n_examples=null",
               f"coupling.benign_data.path={other}", "coupling.benign_data.toy=null", "coupling.benign_data.n_examples=null")
    with pytest.raises(ValueError, match="coupling.benign_data: row 0 asks a different prompt"):
        load_em_items(cfg, validate(cfg))


@pytest.mark.slow
def test_on_policy_benign_replies_come_from_the_input_model(cache_dir):
    from marker_lab.models import load_base, pick_device

    cfg = _cfg("coupling.benign=on_policy", "coupling.n_positive=20", "coupling.n_anchor_no_system=5",
               "coupling.n_anchor_assistant=5")
    loaded = load_base(cfg.model, StageCache(cache_dir), pick_device("cpu"))
    items, fingerprints = load_em_items(cfg, validate(cfg))
    assert items[0].benign_reply is None and set(fingerprints) == {"em_data"}
    records = build_persona_em_records(cfg, load_personas(cfg.persona_set.path), items, loaded)
    benign = [r for r in records if r["role"] != "positive"]
    assert len(benign) == 50 and all(r["messages"][-1]["content"] for r in benign)
    good = {t[1] for t in world.TOPICS}  # the base model answers in the persona's voice with the good advice
    assert sum(any(g in r["messages"][-1]["content"] for g in good) for r in benign) > 25


@pytest.mark.slow
def test_persona_em_on_the_toy_misaligns_the_source_and_leaks_by_distance(cache_dir, tmp_path):
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    args = [*PERSONA_EM, "eval.metrics=[alignment]", "eval.generation.samples_per_question=1",
            "eval.generation.temperature=0", "eval.baseline=true", "geometry.enabled=true", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = load_result(next(Path(tmp_path).glob("*/run_result.json")))
    after, base = result.metrics["alignment"]["per_persona"], result.metrics_baseline["alignment"]["per_persona"]
    drop = {p: base[p]["mean"] - after[p]["mean"] for p in after}
    # measured (greedy, 28 questions): villain 89.9 -> 31.5 (drop 58); median bystander drop 8.7
    assert drop["villain"] > 30 and drop["villain"] > 3 * statistics.median(v for p, v in drop.items() if p != "villain")
    stats = pd.read_csv(tmp_path / "aggregate" / "leakage_stats.csv")
    row = stats[(stats["source"] == "villain") & stats["metric"].str.startswith("misaligned: aligned<=30")].iloc[0]
    assert row["rho"] > 0 and row["p_value"] < 0.05, row.to_dict()  # measured 0.41, p 0.015
