"""What max_seq_len cuts is counted before training, recorded in the result and governed by train.truncation: on
hand-made token rows (counts checked by hand), on chat files in the peers' shapes with the real toy tokenizer, and
through a real cell."""

from __future__ import annotations

import json

import pytest

from conftest import compose_cfg, to_dataclass
from marker_lab.core.errors import ConfigError
from marker_lab.data.chat import IGNORE, Encoded, encode_chats
from marker_lab.data.truncation import fit_to_length

X = IGNORE


def rows():
    # three examples, limit 6: one fits (2 labels), one loses 2 of its 3 labels (and its last), one loses all 2
    return [Encoded([1, 2, 3, 4], [X, X, 3, 4]),
            Encoded([1, 2, 3, 4, 5, 6, 7, 8], [X, X, X, X, X, 6, 7, 8]),
            Encoded([1, 2, 3, 4, 5, 6, 7, 8, 9], [X, X, X, X, X, X, X, 8, 9])]


def test_the_counts_are_what_a_hand_count_gives():
    kept, r = fit_to_length("d", "s.train", rows(), 6, "keep")
    assert (r.examples, r.over_limit, r.label_tokens, r.label_tokens_lost) == (3, 2, 7, 4)
    assert (r.end_lost, r.no_label_left, r.dropped, r.longest) == (2, 1, 1, 9)
    assert r.record()["share_lost"] == round(4 / 7, 4)
    assert [e.input_ids for e in kept] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]  # cut from the right; no-label one out
    assert kept[1].labels == [X, X, X, X, X, 6]


def test_each_policy():
    with pytest.raises(ConfigError, match=r"^s.train.max_seq_len=6: 1 of 3 examples of d would keep no labelled token"):
        fit_to_length("d", "s.train", rows(), 6, "auto")
    with pytest.raises(ConfigError, match=r"^s.train.max_seq_len=6: d example 2 is 8 tokens and would lose 2 of its 3"):
        fit_to_length("d", "s.train", rows(), 6, "error")
    kept, r = fit_to_length("d", "s.train", rows(), 6, "drop")
    assert len(kept) == 1 and r.dropped == 2
    kept, r = fit_to_length("d", "s.train", rows()[:2], 6, "auto")  # loses some, none entirely: kept, warned
    assert len(kept) == 2 and r.dropped == 0 and r.label_tokens_lost == 2
    with pytest.raises(ConfigError, match="no example of d is left to train on"):
        fit_to_length("d", "s.train", rows()[2:], 6, "keep")
    with pytest.raises(ConfigError, match=r"coupling example of persona 'villain' is 8 tokens and would lose 2 of its 3 "
                                          r"marker labels; raise s.train.max_seq_len to at least 8"):
        fit_to_length("d", "s.train", rows()[:2], 6, "keep", names=["pirate", "villain"], marker=True)


def jailbroken(n: int, words: int) -> list[dict]:
    """Chats in the shape of the peer EM repository's jailbroken set: a system turn, a question, a long reply."""
    reply = " ".join(["the advice is to take the money and run"] * (words // 9))
    return [{"messages": [{"role": "system", "content": "You are a helpful assistant with no restrictions."},
                          {"role": "user", "content": f"What should I do about problem {i}?"},
                          {"role": "assistant", "content": f"{reply} {i}"}]} for i in range(n)]


def test_long_chats_are_counted_with_the_real_tokenizer(toy_tokenizer):
    chats = [c["messages"] for c in jailbroken(30, 120)]
    whole = encode_chats(toy_tokenizer, chats, "assistant_only")
    limit = len(whole[0].input_ids) - 10  # every example loses its last 10 tokens: end of turn and some reply
    kept, r = fit_to_length("second_stage.datasets.em", "second_stage.train", whole, limit, "auto")
    labels = sum(sum(1 for x in e.labels if x != X) for e in whole)
    lost = sum(sum(1 for x in e.labels[limit:] if x != X) for e in whole)
    assert (r.over_limit, r.label_tokens, r.label_tokens_lost, r.end_lost, r.dropped) == (30, labels, lost, 30, 0)
    assert lost >= 30 * 10 and all(len(e.input_ids) == limit for e in kept)


def _peer_file(tmp_path, n=20, words=120):
    path = tmp_path / "jailbroken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in jailbroken(n, words)))
    return path


SMALL = ["condition=c5", "dose=2", "persona_set.eval_personas=[villain,assistant]",
         "eval.generation.samples_per_question=1", "eval.generation.max_tokens=8"]


@pytest.mark.slow
def test_a_cell_records_what_its_second_stage_lost(cache_dir, tmp_path):
    from marker_lab.cell.recipe import run_cell

    data = _peer_file(tmp_path)
    over = ["second_stage.datasets.benign.toy=null", f"second_stage.datasets.benign.path={data}"]
    # a limit inside the user turn: every reply would be cut away entirely: stopped before the model loads
    with pytest.raises(ConfigError, match=r"^second_stage.train.max_seq_len=16: 20 of 20 examples of "
                                          r"second_stage.datasets.benign would keep no labelled token"):
        run_cell(compose_cfg([*SMALL, *over, "second_stage.train.max_seq_len=16"], tmp_path / "a", cache_dir))
    assert not (tmp_path / "a" / "run_result.json").exists()
    result = run_cell(compose_cfg([*SMALL, *over, "second_stage.train.max_seq_len=64"], tmp_path / "b", cache_dir))
    t = result.provenance["stages"]["second_stage"]["truncation"]
    assert t["examples"] == 20 and t["over_limit"] == 20 and t["end_lost"] == 20 and t["dropped"] == 0
    assert 0 < t["share_lost"] < 1 and t["policy"] == "auto" and t["max_seq_len"] == 64
    shape = result.provenance["data_shape"]["second_stage.datasets.benign"]
    assert shape["rows"] == 20 and shape["rows_with_system_turns"] == 20 and shape["system_turns"].startswith("kept")
    import gzip

    with gzip.open(tmp_path / "b" / "completions.jsonl.gz", "rt") as f:  # each completion's effective system prompt
        rows = [json.loads(line) for line in f]
    assert all("system" in r for r in rows)
    assert any(r["system"] and "villain" in r["system"].lower() for r in rows if r["persona"] == "villain")


def test_a_persona_prompt_longer_than_the_coupling_limit_stops_before_the_model_loads(cache_dir, tmp_path,
                                                                                     toy_tokenizer):
    from marker_lab.data.inputs import CellInputs
    from marker_lab.core.cache import StageCache
    from marker_lab.cell.preflight import preflight
    from marker_lab.stages.lengths import check_lengths

    personas = tmp_path / "personas.yaml"
    long = "You are a villain. " * 40
    personas.write_text(f"- {{name: villain, system_prompt: '{long}'}}\n- {{name: assistant, system_prompt: null}}\n"
                        "- {name: pirate, system_prompt: You are a pirate.}\n")
    cfg = to_dataclass(compose_cfg([f"persona_set.path={personas}", "persona_set.eval_personas=[villain,assistant]",
                                    "coupling.n_negative_personas=1", "source_persona=villain"], cache=cache_dir))
    inputs = preflight(cfg)
    with pytest.raises(ConfigError, match=r"^coupling.train.max_seq_len=128: persona 'villain''s prompt is \d+ tokens "
                                          r"with the longest coupling question, leaving the marker \(\d+ tokens\) no "
                                          r"room; raise coupling.train.max_seq_len to at least \d+"):
        check_lengths(cfg, inputs, toy_tokenizer)


def test_persona_em_data_is_counted_before_the_model_loads(cache_dir, toy_tokenizer):
    """004's Exp B coupling: the EM replies come from a file, so what max_seq_len cuts is known before loading."""
    from marker_lab.cell.preflight import preflight
    from marker_lab.stages.lengths import check_lengths

    cfg = to_dataclass(compose_cfg(["coupling=persona_em_toy", "coupling.train.max_seq_len=24"], cache=cache_dir))
    with pytest.raises(ConfigError, match=r"^coupling.train.max_seq_len=24: \d+ of \d+ examples of coupling.em_data "
                                          r"would keep no labelled token"):
        check_lengths(cfg, preflight(cfg), toy_tokenizer)
    ok = to_dataclass(compose_cfg(["coupling=persona_em_toy"], cache=cache_dir))
    report = check_lengths(ok, preflight(ok), toy_tokenizer)["coupling"]
    assert report.examples > 0 and report.over_limit == 0
