"""Faults a lab hits, injected for real on the toy model and real files: every one gets a correct rerun, a rebuild,
or one line naming the key, file or line (before any model loads where the case allows). See README "Faults we test".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_cfg, composition_error, to_dataclass
from marker_lab.core.cache import StageCache, verify_entry
from marker_lab.core.errors import ConfigError
from marker_lab.cell.preflight import preflight
from marker_lab.results.contract import RESULT_FILE, is_current, load_result, read_result
from marker_lab.results.sweep import cell_states, format_status, write_manifest
from marker_lab.toy import world

# a small cell: the default coupling (cached), 2 steps of benign SFT on a file we can edit, a short eval
SMALL = ["condition=c5", "dose=2", "persona_set.eval_personas=[villain,assistant]",
         "eval.generation.samples_per_question=2", "eval.generation.max_tokens=24"]


def write_chats(path: Path, n: int = 40) -> Path:
    rows = world.advice_chats("benign", n, seed=3, system_prompt=None)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_cfg(data: Path, out: Path, cache: Path, *extra: str):
    return compose_cfg([*SMALL, "second_stage.datasets.benign.toy=null", f"second_stage.datasets.benign.path={data}",
                        *extra], output_dir=out, cache=cache)


def cli(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "marker_lab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900, **kw)


# -- wrong or stale numbers -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_edited_data_makes_a_result_stale_everywhere(cache_dir, tmp_path):
    from marker_lab.results.aggregate import aggregate
    from marker_lab.cell.recipe import run_cell

    data = write_chats(tmp_path / "benign.jsonl")
    cell = tmp_path / "sweep" / "c5"
    first = run_cell(small_cfg(data, cell, cache_dir))
    assert first.provenance["inputs"]["second_stage.datasets.benign"]["checksum"]
    write_manifest(tmp_path / "sweep", [{"index": 0, "overrides": SMALL, "subdir": "c5",
                                         "config_hash": first.config_hash, "complete": True}], "local")
    assert [s.state for s in cell_states(tmp_path / "sweep")] == ["complete"]

    blob = bytearray(data.read_bytes())  # one byte of one answer: "good" advice now reads "gooe"
    at = blob.index(b"good") + 3
    blob[at] = ord("e")
    data.write_bytes(bytes(blob))

    currency = is_current(load_result(cell / RESULT_FILE), first.config_hash)
    assert not currency.current and "second_stage.datasets.benign changed" in currency.reason
    states = cell_states(tmp_path / "sweep")
    assert [s.state for s in states] == ["stale"] and "second_stage.datasets.benign" in states[0].error
    assert "1 stale" in format_status(tmp_path / "sweep")
    out = aggregate(tmp_path / "sweep")  # the stale result is left out and listed
    assert "c5" in (out / "missing.txt").read_text() and "stale" in (out / "missing.txt").read_text()
    assert "stale" in (out / "report.md").read_text()

    second = run_cell(small_cfg(data, cell, cache_dir))  # the same config: it reruns, on the edited data
    assert second.provenance["inputs"]["second_stage.datasets.benign"]["checksum"] != \
        first.provenance["inputs"]["second_stage.datasets.benign"]["checksum"]
    assert second.provenance["stages"]["second_stage"]["trained_now"]
    assert [s.state for s in cell_states(tmp_path / "sweep")] == ["complete"]
    out = aggregate(tmp_path / "sweep")
    text = (out / "rates.csv").read_text().splitlines()
    header = text[0].split(",")
    row = dict(zip(header, text[1].split(",")))
    assert row["seed"] == "42" and row["dose"] == "2"  # integers stay integers
    zero = pd.read_csv(out / "rates.csv")
    assert (zero.loc[zero["k"] == 0, "ci_low"] == 0).all()  # a bound at 0 is 0, not 6.9e-18


@pytest.mark.slow
def test_a_damaged_cache_entry_is_rebuilt_not_read(cache_dir, tmp_path):
    from marker_lab.cell.recipe import run_cell

    data = write_chats(tmp_path / "benign.jsonl")
    first = run_cell(small_cfg(data, tmp_path / "a", cache_dir, "seed=7"))
    entry = Path(first.provenance["stages"]["second_stage"]["cache_entry"])
    weights = entry / "adapter" / "adapter_model.safetensors"
    assert first.provenance["adapters"]["second_stage"]["adapter_model.safetensors"]
    # overwrite one tensor's bytes with the same number of other bytes (a damaged block): same size, same header
    blob = bytearray(weights.read_bytes())
    blob[-64:] = bytes(64)
    weights.write_bytes(bytes(blob))
    assert "does not match its checksum" in verify_entry(entry)
    again = run_cell(small_cfg(data, tmp_path / "b", cache_dir, "seed=7"))
    assert again.provenance["stages"]["second_stage"]["trained_now"]  # rebuilt under the same key
    assert again.provenance["stage_cache_keys"] == first.provenance["stage_cache_keys"]
    assert again.metrics == first.metrics and verify_entry(entry) is None
    # a truncated file: rebuilt the same way
    weights.write_bytes(weights.read_bytes()[:1000])
    third = run_cell(small_cfg(data, tmp_path / "c", cache_dir, "seed=7"))
    assert third.provenance["stages"]["second_stage"]["trained_now"] and third.metrics == first.metrics


def test_cache_rebuilds_damaged_and_truncated_entries(tmp_path):
    cache, builds = StageCache(tmp_path), []

    def build(d: Path):
        builds.append(1)
        (d / "a.bin").write_bytes(b"x" * 100)

    entry, _ = cache.get_or_build("stages", "k", build)
    (entry / "a.bin").write_bytes(b"y" * 100)
    assert cache.get_or_build("stages", "k", build)[1] and (entry / "a.bin").read_bytes() == b"x" * 100
    (entry / "a.bin").write_bytes(b"x" * 10)
    assert cache.get_or_build("stages", "k", build)[1] and len(builds) == 3
    assert not cache.get_or_build("stages", "k", build)[1] and len(builds) == 3


def test_a_damaged_prebaked_adapter_stops_at_start_up(tmp_path):
    from safetensors.torch import save_file
    import torch

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.zeros(64, 64)}, str(adapter / "adapter_model.safetensors"))
    cfg = to_dataclass(compose_cfg(["condition=c4", f"coupling.adapter_path={adapter}"]))
    inputs = preflight(cfg)
    assert inputs.files["coupling.adapter_path"].checksum
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"coupling.adapter_path: the pre-baked adapter is damaged .*truncated"):
        preflight(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["eval.generation.temperature=-1"], r"eval.generation.temperature: must be in \[0, 100\], got -1"),
    (["eval.generation.temperature=0"], "eval.generation.temperature=0 is greedy: its 10 samples"),
    (["eval.generation.top_p=0"], r"eval.generation.top_p: must be in \(0, 1\]"),
    (["eval.generation.top_p=1.5"], r"eval.generation.top_p: must be in \(0, 1\]"),
    (["eval.generation.max_tokens=0"], "eval.generation.max_tokens: must be >= 1"),
    (["coupling.generation.temperature=-0.5"], r"coupling.generation.temperature: must be in \[0, 100\], got -0.5"),
])
def test_sampling_settings_are_checked_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(to_dataclass(compose_cfg(overrides)))


def test_greedy_with_one_sample_is_accepted():
    cfg = to_dataclass(compose_cfg(["eval.generation.temperature=0", "eval.generation.samples_per_question=1"]))
    inputs = preflight(cfg)
    assert cfg.eval.generation.temperature == 0 and "villain" in inputs.personas
    assert len(inputs.questions["eval.questions"]) == 28  # the eval still reads its questions


@pytest.mark.slow
def test_two_sweeps_on_one_directory(cache_dir, tmp_path):
    seed = 5000 + time.time_ns() % 10**6  # a coupling no other run has cached: the first sweep is busy a while
    args = ["run", "-m", "condition=c4", f"coupling.seed={seed}", "coupling.train.max_steps=60",
            "persona_set.eval_personas=[villain]", "eval.generation.samples_per_question=1",
            f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "marker_lab.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / ".sweep.lock.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    second = cli(args, cache_dir)
    assert second.returncode == 1 and time.time() - t0 < 60
    line = second.stderr.strip().splitlines()[-1]
    assert f"is in use by pid {first.pid} on {socket.gethostname()}" in line, second.stderr[-2000:]
    os.killpg(first.pid, signal.SIGKILL)  # the holder dies: its lock goes with it
    first.wait()
    third = cli(args, cache_dir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over from pid" in third.stdout + third.stderr
    assert [s.state for s in cell_states(tmp_path)] == ["complete"]


# -- every input checked before a model loads ------------------------------------------------------------------

def _bad_data_cfg(tmp_path: Path, text: str):
    path = tmp_path / "em.jsonl"
    path.write_text(text)
    return to_dataclass(compose_cfg(["second_stage.datasets.em.toy=null", f"second_stage.datasets.em.path={path}"])), path


def test_a_malformed_jsonl_line_is_named_with_file_and_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    cfg, path = _bad_data_cfg(tmp_path, f"{good}\n{good}\n{{\"messages\": [\n{good}\n")
    with pytest.raises(ConfigError, match=rf"second_stage.datasets.em.path: {path} line 3: not JSON"):
        preflight(cfg)


def test_a_conversation_without_a_reply_is_refused(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    cfg, path = _bad_data_cfg(tmp_path, f"{good}\n\n{bad}\n")
    with pytest.raises(ConfigError, match=rf"second_stage.datasets.em: {path} line 3: a conversation with no assistant"):
        preflight(cfg)
    cfg.second_stage.train.loss_mode = "full"  # full loss needs no reply
    preflight(cfg)


def test_empty_persona_file_and_unknown_question_format(tmp_path):
    (tmp_path / "p.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"persona_set.path: .*p.yaml: no personas"):
        preflight(to_dataclass(compose_cfg([f"persona_set.path={tmp_path / 'p.yaml'}"])))
    (tmp_path / "q.csv").write_text("id,text\nq1,hello\n")
    with pytest.raises(ConfigError, match=r"eval.questions: .*q.csv: unknown question file format '.csv'; question "
                                          r"files are YAML"):
        preflight(to_dataclass(compose_cfg([f"eval.questions={tmp_path / 'q.csv'}"])))


def test_a_bad_data_file_fails_the_cli_in_one_line_before_loading_a_model(tmp_path, cache_dir):
    path = tmp_path / "em.jsonl"
    path.write_text('{"messages": []}\nnot json\n')
    t0 = time.time()
    proc = cli(["run", "second_stage.datasets.em.toy=null", f"second_stage.datasets.em.path={path}",
                f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert proc.stderr.strip().splitlines()[-1] == (f"marker-lab: config error: second_stage.datasets.em.path: {path} "
                                                    "line 2: not JSON (Expecting value at column 1)")
    # nothing started: the run directory holds only its status, failed with the same line
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["cell_status.json"]
    status = json.loads((tmp_path / "run" / "cell_status.json").read_text())
    assert status["state"] == "failed" and proc.stderr.strip().endswith(status["error"])


def test_a_typo_in_analysis_is_caught_at_composition():
    assert "Invalid value 'wilsn'" in composition_error(["analysis.ci_method=wilsn"])
    assert "analysis.gates[].checks[].op: must be one of" in composition_error(
        ["analysis.gates=[{name: g, checks: [{persona: source, op: '=>', value: 1}]}]"])


# -- status and aggregation read results, not advisory files ----------------------------------------------------

@pytest.mark.slow
def test_damaged_status_and_result_files(cache_dir, tmp_path):
    from marker_lab.results.aggregate import aggregate
    from marker_lab.cell.recipe import run_cell

    data = write_chats(tmp_path / "benign.jsonl")
    sweep = tmp_path / "sweep"
    results = [run_cell(small_cfg(data, sweep / name, cache_dir, f"seed={seed}"))
               for name, seed in (("a", 11), ("b", 12))]
    write_manifest(sweep, [{"index": i, "overrides": [], "subdir": name, "config_hash": r.config_hash, "complete": True}
                           for i, (name, r) in enumerate(zip("ab", results))], "local")
    (sweep / "a" / "cell_status.json").write_text('{"state": "runn')  # damaged: advisory, ignored
    result_b = sweep / "b" / RESULT_FILE
    result_b.write_text(result_b.read_text()[:500])  # truncated result
    assert read_result(result_b).state == "corrupt"
    assert [s.state for s in cell_states(sweep)] == ["complete", "corrupt"]
    assert "1 complete, 1 corrupt" in format_status(sweep)
    out = aggregate(sweep)
    rates = pd.read_csv(out / "rates.csv")
    assert rates[rates["level"] == "cell"]["cell"].unique().tolist() == ["a"]
    again = run_cell(small_cfg(data, sweep / "b", cache_dir, "seed=12"))  # a corrupt result is run again
    assert again.metrics == results[1].metrics and [s.state for s in cell_states(sweep)] == ["complete", "complete"]


@pytest.mark.slow
def test_sigterm_is_recorded_as_how_the_cell_ended(cache_dir, tmp_path):
    seed = 7000 + time.time_ns() % 10**6
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache_dir), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "marker_lab.cli", "run", "condition=c4", f"coupling.seed={seed}",
                             "coupling.train.max_steps=400", f"hydra.run.dir={tmp_path}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not ((tmp_path / "run.log").is_file()
                                          and "stage coupling: training" in (tmp_path / "run.log").read_text()):
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    status = json.loads((tmp_path / "cell_status.json").read_text())
    assert status["state"] == "failed" and "killed by signal 15 (SIGTERM)" in status["error"]
    assert not (tmp_path / RESULT_FILE).exists()


# -- endpoints, names ----------------------------------------------------------------------------------------

def test_an_unreachable_judge_is_one_line_naming_the_url(monkeypatch):
    from marker_lab.config.schema import JudgeConfig
    from marker_lab.eval.judge.backends import JudgeError, JudgeItem, OpenAIJudge

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FAULT_KEY", "k")
    judge = OpenAIJudge(JudgeConfig(backend="openai", model="m", mode="logprob", base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key_env="FAULT_KEY", max_retries=1, timeout_s=2))
    with pytest.raises(JudgeError) as e:
        judge.score_many([JudgeItem("aligned", "q", "a", "prompt")])
    assert str(e.value) == (f"openai judge at http://127.0.0.1:{port}/v1: cannot connect after 1 retries "
                            "(APIConnectionError); is the endpoint up?")


def test_a_judge_that_drops_connections_is_not_asked_for_every_queued_row(monkeypatch, dropping_endpoint):
    """An endpoint that accepts and drops every connection: the first failure ends the batch, and no queued
    request starts after it, instead of each meeting the same fault, which with real retries and timeouts would
    take hours for one eval (on a loaded CI machine Executor.map's own cancelling let 5 through). A second batch
    to the same judge fails at once."""
    from marker_lab.config.schema import JudgeConfig
    from marker_lab.eval.judge.backends import JudgeItem, JudgeUnreachable, OpenAIJudge

    url, accepted = dropping_endpoint
    monkeypatch.setenv("FAULT_KEY", "k")
    judge = OpenAIJudge(JudgeConfig(backend="openai", model="m", mode="logprob", api_key_env="FAULT_KEY",
                                    base_url=url, max_retries=0, timeout_s=5, concurrency=2))
    with pytest.raises(JudgeUnreachable, match="cannot connect after 0 retries"):
        judge.score_many([JudgeItem("aligned", "q", "a", "prompt")] * 40)
    assert 1 <= len(accepted) <= 2  # the failed request, and at most one more already under way (2 workers)
    seen = len(accepted)
    with pytest.raises(JudgeUnreachable, match="cannot connect after 0 retries"):
        judge.score_many([JudgeItem("aligned", "q", "a", "prompt")] * 40)
    assert len(accepted) == seen


def test_judges_at_two_endpoints_do_not_share_scores(monkeypatch):
    from marker_lab.config.schema import JudgeConfig
    from marker_lab.eval.judge.backends import OpenAIJudge
    from marker_lab.eval.judge.cache import judgement_key

    monkeypatch.setenv("FAULT_KEY", "k")
    a, b = (OpenAIJudge(JudgeConfig(backend="openai", model="m", mode="logprob", base_url=url, api_key_env="FAULT_KEY"))
            for url in ("http://a:1/v1", "http://b:1/v1"))
    assert judgement_key(a.identity, "p", "q", "x") != judgement_key(b.identity, "p", "q", "x")


def test_an_override_holding_a_path_gives_one_safe_cell_directory():
    from marker_lab.config.schema import cell_dirname

    a = cell_dirname("condition=c1,second_stage.datasets.em.path=/data/x.jsonl")
    b = cell_dirname("condition=c1,second_stage.datasets.em.path=/other/x.jsonl")
    assert "/" not in a and a.startswith("condition=c1,second_stage.datasets.em.path=x.jsonl~") and a != b
    assert cell_dirname("condition=c1,seed=42") == "condition=c1,seed=42"  # plain names unchanged
    assert len(cell_dirname("x=" + "y" * 400).encode()) <= 200


@pytest.mark.slow
def test_a_train_seed_changes_the_adapter(cache_dir, tmp_path):
    """second_stage.train.seed is read: another seed trains another adapter (data order, LoRA init)."""
    from safetensors.torch import load_file

    from marker_lab.cell.recipe import run_cell

    data = write_chats(tmp_path / "benign.jsonl")

    def adapter(seed: int):
        r = run_cell(small_cfg(data, tmp_path / f"s{seed}", cache_dir, f"second_stage.train.seed={seed}"))
        return load_file(Path(r.provenance["stages"]["second_stage"]["cache_entry"]) / "adapter" / "adapter_model.safetensors")

    a, b, a_again = adapter(1), adapter(2), adapter(1)
    assert any(not (a[k] == b[k]).all() for k in a) and all((a[k] == a_again[k]).all() for k in a)


def test_results_read_where_their_inputs_are_absent_stay_current(tmp_path):
    """Aggregating on another machine: an input that is not there cannot be re-checked, so it does not make the
    result stale (a run there would stop at start-up on the missing file); a changed one does."""
    from marker_lab.results.contract import RunResult

    data = tmp_path / "d.jsonl"
    data.write_text("x\n")
    from marker_lab.core.files import file_checksum

    prov = {"config_hash": "h", "inputs": {"a": {"path": str(data), "checksum": file_checksum(data)},
                                          "b": {"path": str(tmp_path / "elsewhere.yaml"), "checksum": "0"}}}
    result = RunResult(cell={}, metrics={}, provenance=prov, timing={})
    currency = is_current(result, "h")
    assert currency.current and currency.unverified == ("b",)
    data.write_text("y\n")
    assert not is_current(result, "h").current


SAVE_A_LORA = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from marker_lab.config.schema import LoraConfig, ModelConfig
from marker_lab.core.cache import StageCache
from marker_lab.models import toy_model_dir
from marker_lab.stages.lora_stage import _save_adapter
from marker_lab.train.lora import apply_lora
path, _ = toy_model_dir(ModelConfig(), StageCache(Path(sys.argv[1]) / "cache"))
model = apply_lora(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2), seed=0, adapter_name="coupling")
_save_adapter(model, "coupling", Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_one_training_saves_one_adapter_config_in_every_process(tmp_path):
    """The same adapter saved by processes with different string hashing (every fresh Python process differs) has
    the same adapter_config.json bytes: peft writes target_modules from a set, and a cell's provenance records the
    file's checksum, so the same training must not record a different one in each run."""
    configs = set()
    for seed in ("0", "1"):  # two orders of 7 names agree by chance once in thousands
        out = tmp_path / f"hash{seed}"
        subprocess.run([sys.executable, "-c", SAVE_A_LORA, str(out)], check=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        configs.add((out / "adapter" / "adapter_config.json").read_bytes())
    assert len(configs) == 1
    from marker_lab.config.schema import LoraConfig

    assert json.loads(configs.pop())["target_modules"] == sorted(LoraConfig().target_modules)


def test_a_second_import_of_conftest_points_at_the_same_test_cache():
    """A test module that imports `tests.conftest` (not `conftest`) runs this file again: it must not make a second
    test cache and point every CLI the tests start at it (a shared-eval test then compared two caches' builds)."""
    import importlib

    import conftest

    again = importlib.import_module("tests.conftest")
    assert again is not conftest and again.TEST_CACHE == conftest.TEST_CACHE
    assert os.environ["MARKER_LAB_CACHE"] == str(conftest.TEST_CACHE)
