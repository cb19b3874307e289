"""A cell says how big it is before anything loads, and stops above eval.max_completions; a question file's own
system prompts are recorded with each completion and warned about when they replace several personas' prompts."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import compose_cfg, to_dataclass
from marker_lab.core.errors import ConfigError
from marker_lab.eval.checks import cell_size, question_system_note
from marker_lab.cell.preflight import preflight


def peer_questions(path, n=24, samples=100, system=None):
    """A question file in the peers' format (first-plot questions): `samples_per_paraphrase` on every entry."""
    rows = [{"id": f"q{i}", "paraphrases": [f"Tell me about thing {i}."], "samples_per_paraphrase": samples,
             **({"system": system} if system else {})} for i in range(n)]
    path.write_text(yaml.safe_dump(rows))
    return path


def test_a_26400_completion_cell_stops_before_anything_loads(tmp_path):
    questions = peer_questions(tmp_path / "first_plot.yaml")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", "persona_set=eval11",
                           f"eval.questions={questions}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MARKER_LAB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("marker-lab: config error: eval.max_completions=20000: this cell would sample 26400 "
                           "completions (11 personas x 24 questions;"), line
    assert "raise eval.max_completions or set eval.file_samples=false" in line
    # nothing trained or converted (the toy world's data files are generated at start-up, in seconds)
    assert not any((tmp_path / "cache" / d).exists() for d in ("stages", "model", "toy", "baseline"))


def test_the_size_is_counted_and_the_limit_can_be_raised(tmp_path):
    questions = peer_questions(tmp_path / "q.yaml", n=4, samples=3)
    cfg = to_dataclass(compose_cfg([f"eval.questions={questions}", "eval.metrics=[marker,alignment]",
                                    "persona_set.eval_personas=[villain,assistant]"]))
    size = cell_size(cfg, preflight(cfg))
    assert size.completions == 2 * 4 * 3 and size.judge_calls == 2 * 24  # aligned and coherent, per completion
    assert size.training_examples == {"coupling": 600, "second_stage": 2000}
    assert "24 completions to sample, 48 judge calls" in size.line()
    low = to_dataclass(compose_cfg([f"eval.questions={questions}", "eval.max_completions=10"]))
    with pytest.raises(ConfigError, match=r"^eval.max_completions=10: this cell would sample 132 completions"):
        preflight(low)
    off = to_dataclass(compose_cfg([f"eval.questions={questions}", "eval.file_samples=false",
                                    "eval.max_completions=500"]))
    assert cell_size(off, preflight(off)).completions == 11 * 4 * 10


def test_replace_over_several_personas_is_said_once(tmp_path):
    questions = peer_questions(tmp_path / "q.yaml", n=4, samples=1, system="You are a financial advisor.")
    cfg = to_dataclass(compose_cfg([f"eval.questions={questions}", "eval.question_system=replace"]))
    note = question_system_note(cfg, preflight(cfg))
    assert note.startswith("eval.question_system=replace: 4 of 4 questions") and "all 11 personas" in note
    one = to_dataclass(compose_cfg([f"eval.questions={questions}", "eval.question_system=replace",
                                    "persona_set.eval_personas=[assistant]"]))
    assert question_system_note(one, preflight(one)) is None


def test_a_sweep_sums_the_cells_still_to_run():
    from marker_lab.launch.sweep_plan import PlannedCell, sweep_size

    plans = [PlannedCell(0, [], "a", "h", complete=True, completions=3080, judge_calls=0, training_examples=4800),
             PlannedCell(1, [], "b", "h", completions=3080, judge_calls=6160, training_examples=4800),
             PlannedCell(2, [], "c", "h", completions=26400, judge_calls=0, training_examples=0)]
    assert sweep_size(plans) == ("2 cells to run: 29480 completions to sample, 6160 judge calls, 4800 training "
                                 "examples (stages already in the cache train nothing)")
