"""vLLM end to end on the toy model, on vLLM's CPU build (CI builds its own venv for these; README "vLLM"):
a cell evaluated with eval.engine.name=vllm agrees with the hf engine within sampling error, and a sweep's
shared vLLM engine (one LoRA request per cell) gives each cell what the hf engine gives its merged model."""

from __future__ import annotations

from scipy.stats import fisher_exact

from conftest import compose_cfg, vllm_marks
from marker_lab.engines.vllm import available as vllm_available
from marker_lab.results import contract
from marker_lab.results.contract import load_result
from marker_lab.cell.recipe import run_cell

pytestmark = vllm_marks()
EVAL = ["persona_set.eval_personas=[villain,assistant,pirate,sarcastic]"]  # 4 x 28 x 10 completions


def test_a_toy_cell_on_vllm_agrees_with_the_hf_engine(cache_dir, tmp_path):
    """Same cell, same merged weights, two engines: per persona the marker counts may differ by sampling only
    (Fisher's exact test, Bonferroni over personas), and the source keeps its marker on both."""
    assert vllm_available(), "MARKER_LAB_REQUIRE_VLLM=1 but vllm does not import"
    both = ["condition=c1", "dose=5", "eval.metrics=[marker,length]", *EVAL]
    hf = run_cell(compose_cfg(both, tmp_path / "hf", cache_dir))
    vl = run_cell(compose_cfg([*both, "eval.engine.name=vllm"], tmp_path / "vllm", cache_dir))
    assert vl.provenance["engine"] == {"name": "vllm", "per": "cell"}
    # the merged model vLLM loaded (a model's size on disk) is gone once the eval is done; the result stays
    assert not (tmp_path / "vllm" / "merged_model").exists()
    assert (tmp_path / "vllm" / contract.RESULT_FILE).is_file()
    assert vl.provenance["final_model"] == hf.provenance["final_model"]
    a, b = hf.metrics["marker"]["per_persona"], vl.metrics["marker"]["per_persona"]
    assert set(a) == set(b) and all(a[p]["n"] == b[p]["n"] == 280 for p in a)
    for p in a:
        _, pval = fisher_exact([[a[p]["k"], a[p]["n"] - a[p]["k"]], [b[p]["k"], b[p]["n"] - b[p]["k"]]])
        assert pval > 0.01 / len(a), (p, a[p], b[p], pval)
    assert a["villain"]["rate"] > 0.3 and b["villain"]["rate"] > 0.3
    # the same model's completions: their mean lengths in tokens agree too
    for p in a:
        la, lb = (r.metrics["length"]["per_persona"][p]["tokens_mean"] for r in (hf, vl))
        assert abs(la - lb) / la < 0.1, (p, la, lb)


def test_a_shared_vllm_engine_serves_every_cell_s_adapter(cache_dir, tmp_path):
    """Two doses of one grid trained with engine_per=base, then one vLLM engine (two LoRA requests): greedy
    completions equal the hf engine's on each cell's merged model (float32), and the results are complete."""
    from marker_lab.cell.shared import evaluate_pending

    greedy = ["eval.generation.temperature=0", "eval.generation.samples_per_question=1", *EVAL]
    for dose in (3, 6):
        run_cell(compose_cfg(["condition=c1", f"dose={dose}", "engine_per=base", "eval.engine.name=vllm",
                              "eval.save_completions=true", *greedy], tmp_path / "sweep" / f"d{dose}", cache_dir),
                 in_sweep=True)
    report = evaluate_pending(tmp_path / "sweep")
    assert report.problems == [] and len(report.done) == 2
    assert not any((tmp_path / "sweep" / ".shared_eval").glob("*")), "the group's saved model is deleted"
    for dose in (3, 6):
        shared = load_result(tmp_path / "sweep" / f"d{dose}" / contract.RESULT_FILE)
        assert shared.provenance["engine"]["per"] == "base" and shared.provenance["engine"]["cells_on_engine"] == 2
        hf = run_cell(compose_cfg(["condition=c1", f"dose={dose}", "eval.save_completions=true", *greedy],
                                  tmp_path / f"hf{dose}", cache_dir))
        got = {(r["persona"], r["question_id"]): r["completion"] for r in
               contract.read_completions(tmp_path / "sweep" / f"d{dose}" / contract.COMPLETIONS_FILE)}
        want = {(r["persona"], r["question_id"]): r["completion"] for r in
                contract.read_completions(tmp_path / f"hf{dose}" / contract.COMPLETIONS_FILE)}
        assert got.keys() == want.keys()
        same = sum(got[k] == want[k] for k in want) / len(want)
        # LoRA applied unmerged (vLLM) vs merged (hf): float rounding may flip a near-tie now and then
        assert same >= 0.95, same
        for p, c in hf.metrics["marker"]["per_persona"].items():
            assert abs(shared.metrics["marker"]["per_persona"][p]["k"] - c["k"]) <= 2, p
