"""The latent probe (issue 9): fitted on the coupled model, frozen, read on every model of a cell; aggregated beside
the surface marker rate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import composition_error, compose_cfg, to_dataclass
from marker_lab.core.errors import ConfigError
from marker_lab.cell.preflight import preflight as validate
from marker_lab.core.files import md5_file
from marker_lab.data.questions import Question
from marker_lab.data.questions import split_questions
from marker_lab.stats import auc_ci

PROBE = ["eval.metrics=[marker,probe]", "eval.generation.samples_per_question=4", "eval.probe.target=marker",
         "eval.probe.samples=4", "dose=10"]


def test_question_split_is_seeded_disjoint_and_keeps_paraphrases_together():
    questions = [Question(f"q{i}", f"text {i}") for i in range(28)]
    train, heldout = split_questions(questions, 0.5, seed=0)
    assert len(train) == len(heldout) == 14 and not {q.id for q in train} & {q.id for q in heldout}
    assert split_questions(questions, 0.5, seed=0) == (train, heldout)
    assert split_questions(questions, 0.5, seed=1) != (train, heldout)
    paraphrased = [Question(f"p{i}/{j}", f"phrasing {j} of {i}") for i in range(6) for j in range(3)]
    train, heldout = split_questions(paraphrased, 0.5, seed=0)
    assert len(heldout) == 9 and not {q.id.split("/")[0] for q in train} & {q.id.split("/")[0] for q in heldout}


def test_auc_ci_is_the_roc_auc_with_an_interval_over_questions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    question = rng.normal(0, 1, 30)  # a question effect every persona shares
    pos, neg = question + 1 + rng.normal(0, 0.5, 30), question + rng.normal(0, 0.5, (10, 30))
    value, low, high = auc_ci(pos, neg)
    assert value == pytest.approx(roc_auc_score([1] * 30 + [0] * 300, np.r_[pos, neg.ravel()]))
    assert low < value < high and 0.5 < low and high < 1
    assert auc_ci(np.ones(5), np.zeros((3, 5))) == (1.0, 1.0, 1.0)  # separable: every resample too, no NaN
    assert all(np.isnan(auc_ci([0.9], [[0.1]])))  # one question: no interval


def test_probe_weights_balance_a_rare_source_like_sklearns_balanced_classes():
    """The soft-label fit (each prompt as a positive with weight y and a negative with 1 - y, classes to equal
    totals) is sklearn's class_weight='balanced' when labels are 0/1."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), (rng.random(60) < 0.15).astype(float)
    weight = np.r_[y / y.sum(), (1 - y) / (1 - y).sum()] * len(y) / 2
    ours = LogisticRegression(C=0.5, max_iter=5000).fit(np.r_[x, x], np.r_[np.ones(60), np.zeros(60)], sample_weight=weight)
    theirs = LogisticRegression(C=0.5, max_iter=5000, class_weight="balanced").fit(x, y)
    assert np.allclose(ours.coef_, theirs.coef_, atol=1e-5) and np.allclose(ours.intercept_, theirs.intercept_, atol=1e-5)


def test_probe_settings_are_checked_before_anything_runs(tmp_path):
    validate(to_dataclass(compose_cfg(["condition=c1", *PROBE])))
    with_system = tmp_path / "with_system.yaml"
    with_system.write_text("- id: s\n  system: answer in json .\n  paraphrases: [\"hi ?\", \"hello ?\"]\n"
                           "- id: t\n  paraphrases: [\"bye ?\", \"see you ?\"]\n")
    for overrides, message in [(["eval.probe.target=villainy"], "Invalid value 'villainy', expected one of [source, marker]"),
                               (["eval.probe.position=first"], "key: eval.probe.position")]:
        assert message in composition_error(["condition=c1", *PROBE, *overrides])
    bad = [
           (["condition=c4", "dose=0", "eval.probe.fit_on=second_stage"], "eval.probe.fit_on=second_stage: this cell runs no"),
           (["eval.probe.personas=[assistant,pirate]"], "eval.probe.personas: must hold the source persona 'villain'"),
           (["eval.probe.personas=[villain,nobody]"], "eval.probe.personas: .*nobody"),
           (["eval.probe.personas=[villain,pirate,villain]"], "eval.probe.personas: .* each once"),
           (["eval.probe.heldout_fraction=1"], r"eval.probe.heldout_fraction: must be in \(0, 1\)"),
           (["eval.probe.heldout_fraction=0.02"], "eval.probe.heldout_fraction=0.02: .* 27 training and 1 held-out"),
           (["eval.probe.questions=/no/such.yaml"], "eval.probe.questions: file not found: /no/such.yaml"),
           ([f"eval.probe.questions={with_system}"], "eval.probe.questions: .* their own system prompt"),
           (["eval.during_training.every_n_steps=5", "eval.during_training.metrics=[probe]"],
            "eval.during_training.metrics: probe reads every model")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate(to_dataclass(compose_cfg(["condition=c1", *PROBE, *overrides])))


@pytest.mark.slow
def test_probe_separates_the_source_on_the_coupled_model_and_reads_every_later_model(cache_dir, tmp_path):
    from marker_lab.results.aggregate import aggregate
    from marker_lab.cell.recipe import run_cell

    em = run_cell(compose_cfg(["condition=c1", *PROBE], tmp_path / "em", cache_dir))
    benign = run_cell(compose_cfg(["condition=c5", *PROBE], tmp_path / "benign", cache_dir))
    probe = em.metrics["probe"]
    assert list(probe["models"]) == ["base", "after_coupling", "after_second_stage"]
    assert probe["fit_model"] == "after_coupling" and probe["before_second_stage"] == "after_coupling"
    assert not set(probe["questions"]["train"]) & set(probe["questions"]["heldout"])

    # the coupled model: its probe tells the source apart on questions it was not fitted on
    coupled = probe["models"]["after_coupling"]
    assert coupled["auc"] > 0.9 and coupled["auc_ci"][0] > 0.75
    # the latent is the coupling's: the base model's source does not score high on it
    assert probe["models"]["base"]["per_persona"]["villain"]["mean_score"] < coupled["per_persona"]["villain"]["mean_score"]
    # after the second stage: computed (not asserted to survive) with its change from the coupled model
    after = probe["models"]["after_second_stage"]
    assert 0 <= after["auc"] <= 1 and after["auc_change"] == pytest.approx(after["auc"] - coupled["auc"])
    for p, c in after["per_persona"].items():
        assert c["mean_score_change"] == pytest.approx(c["mean_score"] - coupled["per_persona"][p]["mean_score"])
    assert probe["per_persona"] == after["per_persona"] and probe["auc"] == after["auc"]

    assert after["source_margin_change"] == pytest.approx(after["source_margin"] - coupled["source_margin"])
    assert 0 < em.timing.parts["readouts.probe"] <= em.timing.phases["readouts"]

    # fitted once: the benign cell shares the coupled model, so it reuses the probe and reads the same coupled model;
    # so does a cell that reports with other interval settings (n_bootstrap is not part of the fit)
    other = benign.metrics["probe"]
    assert other["fit"]["cache_key"] == probe["fit"]["cache_key"] and not other["fit"]["fitted_now"]
    assert other["models"]["after_coupling"] == coupled
    no_dose = [o for o in PROBE if not o.startswith("dose=")]
    fewer = run_cell(compose_cfg(["condition=c4", *no_dose, "eval.probe.n_bootstrap=200",
                                  "persona_set.eval_personas=[villain]"], tmp_path / "c4", cache_dir)).metrics["probe"]
    assert fewer["fit"]["cache_key"] == probe["fit"]["cache_key"] and not fewer["fit"]["fitted_now"]
    assert fewer["models"]["after_coupling"]["auc"] == coupled["auc"]
    entry = probe["fit"]["cache_entry"]
    assert em.provenance["data_md5"]["probe/probe.npz"] == md5_file(f"{entry}/probe.npz")
    labels = np.load(f"{entry}/train_labels.npy")
    assert len(labels) == 11 * len(probe["questions"]["train"]) and 0 < labels.mean() < 1  # marker rates as labels

    out = aggregate(tmp_path)
    table = pd.read_csv(out / "probe.csv")
    assert len(table) == 2 * 3 * 11 + 2 * 11  # the c4 cell: base and coupled
    assert (table["probe_C"] == 0.01).all() and set(table["fit_on"]) == {"coupling"}
    em_after = table[(table["second_stage"] == "em") & (table["model"] == "after_second_stage")]
    assert em_after["mean_score_change"].notna().all()
    final = table[(table["model"] == "after_second_stage") & (table["persona"] == "villain")]
    assert sorted(final["surface_rate"]) == sorted(r.metrics["marker"]["per_persona"]["villain"]["rate"] for r in (em, benign))
    summary = pd.read_csv(out / "probe_summary.csv")
    assert set(summary["second_stage"]) == {"em", "benign", "none"} and (summary["seeds"] == 1).all()
    assert (out / "figures" / "surface_vs_latent.png").stat().st_size > 10_000
    def no_nan(constant):
        raise AssertionError(f"run_result.json holds {constant}")

    json.loads((tmp_path / "em" / "run_result.json").read_text(), parse_constant=no_nan)  # strict JSON, no NaN


@pytest.mark.slow
def test_probe_in_reverse_order_is_fitted_last_and_compared_with_the_base(cache_dir, tmp_path):
    from marker_lab.cell.recipe import run_cell

    # the same cell as tests/test_cell.py's reverse-order test (its stages are cached), read with the probe
    result = run_cell(compose_cfg(["condition=c1", "order=reverse", "dose=5", "persona_set.eval_personas=[villain,assistant]",
                                   "eval.metrics=[marker,probe]", "eval.generation.samples_per_question=2"], tmp_path, cache_dir))
    probe = result.metrics["probe"]
    assert list(probe["models"]) == ["base", "after_second_stage", "after_coupling"]
    assert (probe["fit_model"], probe["before_second_stage"], probe["final_model"]) == ("after_coupling", "base", "after_coupling")
    coupled, base = probe["models"]["after_coupling"], probe["models"]["base"]
    assert coupled["auc"] > 0.9 and "auc_change" not in base
    assert coupled["auc_change"] == pytest.approx(coupled["auc"] - base["auc"])
    assert len(probe["per_persona"]) == 11  # the probe reads every persona of the set, not only the eval's two
