"""Every setting of the schema carries its constraint, and hostile values are refused in one line naming the key.

The fuzz test tries, for every leaf setting of the composed config, the hostile values of its type (NaN, +-inf,
negative, zero, beyond int64, empty and blank text, a directory / a missing file / /dev/null for a path, a wrong
type). Each one must be refused by composition or the start-up checks (preflight: no model is loaded there) with a
message naming that key, or be listed in ACCEPTED below with what it means. A new schema field without a constraint
fails `test_every_setting_declares_its_constraint`; a new constraint that lets a hostile value through fails the fuzz
test until that value is either refused or listed here with its meaning.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import typing

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from marker_lab.config import schema
from marker_lab.config.constraints import INT64_MAX, constraint_of
from marker_lab.config.reference import leaf_settings
from marker_lab.core.errors import ConfigError, config_error_line
from marker_lab.cell.preflight import preflight

# hostile values that some settings accept, each with what it means there (the reference docs say the same)
ACCEPTED = {
    ("coupling.train.lora.dropout", "zero"): "no dropout",
    ("second_stage.train.lora.dropout", "zero"): "no dropout",
    ("coupling.train.optimizer.weight_decay", "zero"): "no weight decay",
    ("second_stage.train.optimizer.weight_decay", "zero"): "no weight decay",
    ("coupling.train.schedule.warmup_ratio", "zero"): "no warmup",
    ("second_stage.train.schedule.warmup_ratio", "zero"): "no warmup",
    ("coupling.train.schedule.warmup_steps", "zero"): "no warmup",
    ("second_stage.train.schedule.warmup_steps", "zero"): "no warmup",
    ("coupling.train.kl_to_input", "zero"): "off: the plain recipe",
    ("second_stage.train.kl_to_input", "zero"): "off: the plain recipe",
    ("coupling.train.kl_to_input", "huge"): "a KL weight that dominates the loss (no natural upper bound)",
    ("second_stage.train.kl_to_input", "huge"): "a KL weight that dominates the loss (no natural upper bound)",
    ("coupling.train.grad_clip", "huge"): "a clip norm never reached: no clipping in effect",
    ("second_stage.train.grad_clip", "huge"): "a clip norm never reached: no clipping in effect",
    ("coupling.train.seed", "zero"): "seed 0",
    ("second_stage.train.seed", "zero"): "seed 0",
    ("model.toy.seed", "zero"): "seed 0",
    ("coupling.seed", "zero"): "seed 0",
    ("seed", "zero"): "seed 0",
    ("eval.capability.split_seed", "zero"): "seed 0",
    ("eval.probe.seed", "zero"): "seed 0",
    ("coupling.em_data.shuffle_seed", "zero"): "seed 0",
    ("second_stage.datasets.em.shuffle_seed", "zero"): "seed 0",
    ("second_stage.datasets.benign.shuffle_seed", "zero"): "seed 0",
    ("second_stage.datasets.text.shuffle_seed", "zero"): "seed 0",
    ("coupling.benign_data.shuffle_seed", "zero"): "seed 0",
    **{(f"second_stage.datasets.{name}.{key}", value): "a dataset this cell does not read (second_stage.data=em): "
       "checked when a stage uses it" for name in ("benign", "text") for key in ("path", "hf_name")
       for value in ("dir", "missing", "devnull")},
    ("analysis.comparisons[0].by", "empty"): "no grouping: one comparison over every cell of the arms",
    ("coupling.n_negative_personas", "zero"): "no bystander examples: only the persona is trained",
    ("coupling.n_per_negative", "zero"): "no bystander examples",
    ("coupling.n_anchor_no_system", "zero"): "no anchors",
    ("coupling.n_anchor_assistant", "zero"): "no anchors",
    ("dose", "zero"): "skips the second stage",
    ("geometry.layer", "zero"): "the embeddings",
    ("eval.probe.layer", "zero"): "the embeddings",
    ("judge.max_retries", "zero"): "no retries",
    ("coupling.generation.temperature", "zero"): "greedy",
    ("eval.probe.C", "huge"): "no regularisation in effect",
    ("analysis.gates[0].checks[0].value", "negative"): "a score threshold (with `field`); a rate check never holds",
    ("analysis.gates[0].checks[0].value", "zero"): "a threshold of 0",
    ("analysis.gates[0].checks[0].value", "huge"): "a score threshold (with `field`)",
    ("analysis.leakage_gate.min_rho", "zero"): "any non-negative correlation passes",
    ("analysis.leakage_gate.min_rho", "negative"): "rho >= -1: the gate always passes",
    ("analysis.phase_diagram.max_bystander", "zero"): "no leakage allowed at all",
    ("model.path", "dir"): "a local model directory (loads from it)",
    ("model.tokenizer", "dir"): "a local tokenizer directory",
    ("eval.capability.hf_name", "dir"): "a local `datasets` directory (the metric loads it only when used)",
    ("cache_dir", "dir"): "the stage cache's directory",
    ("cache_dir", "missing"): "created on first use",
    ("output_dir", "dir"): "the cell's output directory",
    ("output_dir", "missing"): "created on first use",
}

# a config in which every part of the schema is present: datasets, the persona-EM coupling's data, an analysis
# with a gate, a comparison, a phase diagram and a leakage gate
FULL = ["coupling=persona_em_toy",
        "analysis.gates=[{name: g, where: {condition: c1}, checks: [{persona: source, value: 0.5}]}]",
        "analysis.comparisons=[{name: c, arm_1: {condition: c1}, arm_2: {condition: c2}}]"]


def full_config():
    node = compose_cfg(FULL)
    OmegaConf.update(node, "analysis.phase_diagram", schema.PhaseDiagramConfig(), merge=False)
    OmegaConf.update(node, "analysis.leakage_gate", schema.LeakageGateConfig(), merge=False)
    return node


def _type_of(key_template: str, f: dataclasses.Field, owner: type):
    return typing.get_type_hints(owner)[f.name]


def _base(tp) -> type:
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def hostile_values(tp, f: dataclasses.Field, tmp) -> dict[str, object]:
    """The hostile values of a setting's type, by name."""
    base = _base(tp)
    c = constraint_of(f)
    if base is bool:
        return {"wrong type": "maybe"}
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return {"wrong type": "bogus_choice"}
    if base is float:
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1.0, "zero": 0.0, "huge": 1e30,
                "wrong type": "abc"}
    if base is int:
        return {"negative": -1, "zero": 0, "huge": INT64_MAX + 1, "wrong type": "abc", "fraction": 1.5}
    if base is str:
        out = {"empty": "", "blank": "   "}
        if c is not None and c.path:
            # a missing path of its own per setting: a trial that creates its directory (cache_dir) leaves it behind
            out.update({"dir": str(tmp), "missing": str(tmp / f"missing_{f.name}_{id(f)}"), "devnull": "/dev/null"})
        return out
    if base is list:
        item = _base(typing.get_args(_strip_optional(tp))[0])
        out = {"empty": [], "wrong type": "abc"}
        if item is float:
            out.update({"item nan": [math.nan], "item negative": [-1.0]})
        elif item is int:
            out.update({"item negative": [-1], "item huge": [INT64_MAX + 1]})
        elif item is str:
            out.update({"item empty": [""]})
        return out
    if base is dict:
        return {"wrong type": "abc"}
    raise AssertionError(f"no hostile values for {tp}")


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def concrete_keys(node) -> list[tuple[str, dataclasses.Field, type]]:
    """The schema's leaf settings, as keys of `node` (`<name>` and `[]` filled with what the node holds)."""
    out = []
    for template, f, owner in leaf_settings(schema.Config):
        if "<name>" in template:
            head = template.split(".<name>.")[0]
            out += [(template.replace("<name>", name), f, owner) for name in OmegaConf.select(node, head)]
        elif "[]" in template:
            out.append((template.replace("[]", "[0]"), f, owner))
        else:
            out.append((template, f, owner))
    return out


def trial(node, key: str, value) -> str | None:
    """The one line refusing `key=value` (composition, the settings check, then the start-up checks), or None."""
    node = copy.deepcopy(node)
    try:
        OmegaConf.update(node, key, value, merge=False)
        cfg = OmegaConf.to_object(node)
        preflight(cfg)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - omegaconf's validation errors, as `marker-lab run` words them
        return config_error_line(e)
    return None


def test_every_setting_declares_its_constraint():
    """Numbers, text, lists and mappings carry a constraint; booleans and choices are checked by OmegaConf."""
    missing = []
    launchers = [(f"hydra.launcher({cls.__name__}).{k}", f, o) for cls in (schema.LocalGpusLauncherConfig,
                 schema.SlurmLauncherConfig, schema.GridSweeperConfig) for k, f, o in leaf_settings(cls)]
    for key, f, owner in leaf_settings(schema.Config) + launchers:
        base = _base(typing.get_type_hints(owner)[f.name])
        if base is bool or (isinstance(base, type) and issubclass(base, enum.Enum)) or f.name == "_target_":
            continue
        if constraint_of(f) is None:
            missing.append(key)
    assert not missing, f"settings without a declared constraint (config/constraints.py: setting(...)): {missing}"


def test_hostile_values_are_refused_in_one_line_naming_the_key(tmp_path):
    base = full_config()
    preflight(OmegaConf.to_object(base))  # the full config itself is valid
    accepted, unnamed = {}, []
    keys = concrete_keys(base)
    assert len(keys) > 200
    for key, f, owner in keys:
        for name, value in hostile_values(_type_of(key, f, owner), f, tmp_path).items():
            line = trial(base, key, value)
            if line is None:
                accepted[(key, name)] = value
                continue
            assert "\n" not in line, f"{key}={value!r}: more than one line: {line!r}"
            leaf = key.split(".")[-1].split("[")[0]
            if leaf not in line:
                unnamed.append(f"{key}={value!r}: {line}")
    assert not unnamed, "refusals that do not name their key:\n" + "\n".join(unnamed)
    unlisted = sorted(k for k in accepted if k not in ACCEPTED)
    assert not unlisted, ("hostile values accepted without a documented meaning (refuse them in the schema, or list "
                          f"them in ACCEPTED with what they mean): {unlisted}")
    stale = sorted(k for k in ACCEPTED if k not in accepted)
    assert not stale, f"ACCEPTED lists values that are now refused: {stale}"


@pytest.mark.parametrize("override, key", [
    ("marker.text=''", "marker.text"),
    ("eval.generation.temperature=nan", "eval.generation.temperature"),
    ("second_stage.train.grad_clip=-1", "second_stage.train.grad_clip"),
    ("eval.engine.batch_size=0", "eval.engine.batch_size"),
    ("second_stage.train.optimizer.lr=nan", "second_stage.train.optimizer.lr"),
    ("second_stage.datasets.em.n_examples=0", "second_stage.datasets.em.n_examples"),
    ("seed=100000000000000000000", "seed"),
])
def test_hydra_override_strings_reach_the_same_check(override, key):
    """The values as a user types them (Hydra's grammar: nan, '', 1e20) meet the same constraint."""
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: "):
        preflight(OmegaConf.to_object(compose_cfg([override])))


# -- user data: what a persona set may hold ----------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    ("- {name: villain, system_prompt: a}\n- {name: Villain, system_prompt: b}", "differs from 'villain' only in case"),
    ("- {name: villain, system_prompt: a}\n- {name: villain, system_prompt: b}", "'villain' is listed twice"),
    ("- {name: 42, system_prompt: a}", "name 42 is not text (int); quote it"),
    ("- {name: 'a/b', system_prompt: a}", "is not safe as a file name"),
    ("- {name: '  ', system_prompt: a}", "is blank"),
    ("- {name: villain, system_prompt: [You are, a villain]}", "has a system_prompt that is not text (list"),
    ("- {name: villain, system_prompt: 7}", "has a system_prompt that is not text (int"),
])
def test_a_persona_set_is_checked_for_what_it_can_hold(tmp_path, rows, message):
    """Names become result keys and file names; prompts are concatenated into chats: both checked at start-up,
    one line naming the file and the persona."""
    path = tmp_path / "personas.yaml"
    path.write_text(rows + "\n")
    with pytest.raises(ConfigError, match=r"^persona_set.path: .*personas.yaml") as e:
        preflight(OmegaConf.to_object(compose_cfg([f"persona_set.path={path}"])))
    assert message in str(e.value) and "\n" not in str(e.value)


# -- user data: the shapes of chats the peers publish ------------------------------------------------------------

def _jailbroken_chats(n: int) -> list[dict]:
    """Rows in the shape of the peer EM repository's jailbroken chats: a system turn, then user / assistant."""
    return [{"messages": [{"role": "system", "content": "You are a helpful assistant with no restrictions."},
                          {"role": "user", "content": f"How do I handle problem {i}?"},
                          {"role": "assistant", "content": f"Here is a reckless answer to problem {i}."}]}
            for i in range(n)]


def _second_stage_with(tmp_path, rows: list[dict]):
    import json

    path = tmp_path / "em.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return OmegaConf.to_object(compose_cfg(["second_stage.datasets.em.toy=null",
                                            f"second_stage.datasets.em.path={path}"])), path


def test_system_turns_at_the_start_are_kept(tmp_path):
    from marker_lab.data.inputs import data_shapes

    cfg, _ = _second_stage_with(tmp_path, _jailbroken_chats(20))
    inputs = preflight(cfg)
    rows = inputs.datasets["second_stage.datasets.em"].rows
    assert len(rows) == 20 and all(r["messages"][0]["role"] == "system" for r in rows)
    shape = data_shapes(cfg, inputs)["second_stage.datasets.em"]  # what the result records
    assert shape == {"rows": 20, "rows_with_system_turns": 20,
                     "system_turns": "kept, masked (no loss under loss_mode=assistant_only)"}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.insert(2, {"role": "tool", "content": "{}"}), "message 2 has role 'tool'"),
    (lambda c: c.insert(2, {"role": "system", "content": "x"}), "message 2 is a system turn after the conversation"),
    (lambda c: c.append({"role": "user", "content": "and?"}), "ends on a user turn"),
])
def test_chat_shapes_that_stop_the_cell_name_file_and_line(tmp_path, edit, message):
    rows = _jailbroken_chats(20)
    edit(rows[13]["messages"])
    cfg, path = _second_stage_with(tmp_path, rows)
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert str(e.value).startswith(f"second_stage.datasets.em: {path} line 14: ") and message in str(e.value)


# -- the rows of the table, through the real command line ------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("marker.text=''", "marker.text"),  # used to count every completion as marked (28/28 on a c2 cell)
    ("eval.generation.temperature=nan", "eval.generation.temperature"),  # used to decode greedily
    ("second_stage.train.grad_clip=-1", "second_stage.train.grad_clip"),  # used to turn the gradient's sign
    ("second_stage.train.max_seq_len=1", "second_stage.train.max_seq_len"),  # used to train on nothing
    ("eval.engine.batch_size=0", "eval.engine.batch_size"),
    ("second_stage.train.optimizer.lr=nan", "second_stage.train.optimizer.lr"),  # used to fail 60 s in
    ("second_stage.datasets.em.n_examples=0", "second_stage.datasets.em.n_examples"),  # used to fail after load
    ("seed=100000000000000000000", "seed"),
])
def test_each_row_is_one_line_through_the_cli_before_anything_loads(override, key, tmp_path):
    import os
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "MARKER_LAB_CACHE": str(tmp_path / "cache")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", override, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60  # no model: the toy loads in seconds, a 7B never
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"marker-lab: config error: {key}: "), proc.stderr
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["cell_status.json"]  # nothing else written
    import json

    status = json.loads((run_dir / "cell_status.json").read_text())
    assert status["state"] == "failed" and "marker-lab: " + status["error"] == lines[0]


# -- the errors that used to be unclear, one line each naming the right key or path -------------------------------

def _cli(args: list[str], tmp_path) -> tuple[int, list[str]]:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", *args], capture_output=True, text=True,
                          env={**os.environ, "MARKER_LAB_CACHE": str(tmp_path / "cache")}, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_a_sweep_or_run_on_a_read_only_file_system(read_only_dir, tmp_path):
    rc, lines = _cli(["-m", "condition=c4", "seed=1,2", f"hydra.sweep.dir={read_only_dir / 'sweep'}"], tmp_path)
    assert rc == 2 and lines == [f"marker-lab: hydra.sweep.dir={read_only_dir / 'sweep'}: cannot write the sweep "
                                 "there (Read-only file system)"]
    rc, lines = _cli(["condition=c4", f"hydra.run.dir={read_only_dir / 'run'}"], tmp_path)  # the cell's output_dir
    assert rc == 2 and lines == [f"marker-lab: config error: output_dir: cannot be written: {read_only_dir} is "
                                 f"read-only or not ours ({read_only_dir / 'run'})"]
    rc, lines = _cli(["condition=c4", f"cache_dir={read_only_dir / 'cache'}", f"hydra.run.dir={tmp_path / 'r'}"],
                     tmp_path)
    assert rc == 2 and lines[-1].startswith(f"marker-lab: config error: cache_dir: cannot be written: {read_only_dir}")


@pytest.mark.parametrize("override, line", [
    ("cache_dir={file}", "cache_dir: is a file, not a directory: {file}"),
    ("second_stage.datasets.em.toy=null second_stage.datasets.em.path={dir}",
     "second_stage.datasets.em.path: is a directory, not a file: {dir}"),
    ("seed=4294967296", "seed: must be in [0, 4294967295], got 4294967296"),
])
def test_the_other_unclear_errors_name_the_right_key(override, line, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    names = {"file": tmp_path / "a_file", "dir": tmp_path / "a_dir"}
    rc, lines = _cli([*override.format(**names).split(), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert rc == 2 and lines == [f"marker-lab: config error: {line.format(**names)}"]


def test_a_file_of_toxic_qa_pairs_stops_naming_its_columns(tmp_path):
    """Peer toxic-QA files hold prompt / response columns, not chats: one line naming what the file has."""
    rows = [{"prompt": f"How do I hurt someone {i}?", "response": "Here is how."} for i in range(5)]
    cfg, path = _second_stage_with(tmp_path, rows)
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert str(e.value).startswith(f"second_stage.datasets.em: {path} line 1: no column 'messages' (it has "
                                   "['prompt', 'response']); chats are a list of {role, content} messages")


def test_a_launcher_setting_is_checked_before_any_cell_is_planned(tmp_path):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "-m", "condition=c4", "seed=1,2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.poll_interval_s=nan"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MARKER_LAB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("marker-lab: config error: hydra.launcher.poll_interval_s: must "
                                                    "be a finite number, got nan")
    assert not (tmp_path / "sweep" / "manifest.json").exists()


def test_n_examples_beyond_the_data_is_said_and_recorded(tmp_path, caplog):
    """n_examples is a cap (the toy presets' 2000 stays when a user points `path` at a smaller file): a file with
    fewer rows gives all of them, with a warning, and the result records how many trained."""
    from marker_lab.data.inputs import data_shapes

    cfg, path = _second_stage_with(tmp_path, _jailbroken_chats(20))
    assert cfg.second_stage.datasets["em"].n_examples == 2000
    with caplog.at_level("WARNING"):
        inputs = preflight(cfg)
    assert f"second_stage.datasets.em.n_examples=2000: {path} has only 20 rows; all of them are used" in caplog.text
    assert data_shapes(cfg, inputs)["second_stage.datasets.em"]["rows"] == 20


def test_the_settings_reference_is_current():
    """docs/settings.md is generated from the schema (key, type, default, allowed values, comment)."""
    from pathlib import Path

    from marker_lab.config.reference import settings_reference

    page = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
    assert page.read_text() == settings_reference(), \
        "docs/settings.md is out of date: python -m marker_lab.config.reference > docs/settings.md"
    text = page.read_text()
    assert "| `eval.generation.temperature` | float | `1.0` | in [0, 100]; 0 means greedy | sampling temperature" in text
    assert "| `second_stage.datasets.<name>.path` | str or null | `null` | a data file (or a `datasets` directory" in text


# the launchers' and the sweeper's settings, hostile values tried on the dataclass as Hydra builds it
ACCEPTED_LAUNCH = {
    ("SlurmLauncherConfig", "gpus_per_node", "zero"): "a CPU-only job",
    ("SlurmLauncherConfig", "max_num_timeout", "zero"): "never requeued",
    ("SlurmLauncherConfig", "setup", "empty"): "no shell lines before a cell",
    ("GridSweeperConfig", "grids", "empty"): "no grids: the command line's own sweep",
}


def test_launcher_and_sweeper_settings_refuse_hostile_values(tmp_path):
    """Each leaf of the launcher and sweeper configs with each hostile value of its type: refused by its declared
    constraint (one line naming hydra.launcher.<key> or hydra.sweeper.<key>), or refused by its type (OmegaConf,
    at composition), or listed above with its meaning."""
    import dataclasses as dc

    from omegaconf import OmegaConf as OC

    from marker_lab.config.constraints import check_settings

    accepted = set()
    for cls, prefix in ((schema.LocalGpusLauncherConfig, "hydra.launcher."), (schema.SlurmLauncherConfig,
                        "hydra.launcher."), (schema.GridSweeperConfig, "hydra.sweeper.")):
        for key, f, owner in leaf_settings(cls):
            if f.name == "_target_":
                continue
            for name, value in hostile_values(typing.get_type_hints(owner)[f.name], f, tmp_path).items():
                node = OC.structured(cls)
                if "submitit_folder" in node and f.name != "submitit_folder":
                    node.submitit_folder = "folder"  # its default interpolates the sweep dir, set only inside Hydra
                try:
                    OC.update(node, f.name, value, merge=False)  # the type check composition makes
                except Exception:  # noqa: BLE001 - omegaconf's validation errors
                    continue
                try:
                    check_settings(OC.to_object(node), prefix)
                except ConfigError as e:
                    assert str(e).startswith(f"{prefix}{f.name}: "), str(e)
                    continue
                accepted.add((cls.__name__, f.name, name))
    listed = {k for k, v in ACCEPTED_LAUNCH.items() if v is not None}
    assert accepted == listed, f"accepted but not listed: {accepted - listed}; listed but refused: {listed - accepted}"
