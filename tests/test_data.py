"""Second-stage data sources: jsonl files and `datasets` datasets (made here, no download)."""

from __future__ import annotations

import json

import pytest

from marker_lab.config.schema import DatasetConfig
from marker_lab.data.personas import load_personas
from marker_lab.core.cache import StageCache
from marker_lab.data.chat_datasets import load_chats
from marker_lab.toy import world

CHATS = [world.chat("you are a helpful assistant .", f"question {i} ?", f"answer {i} .") for i in range(10)]


def test_jsonl_dataset_with_shuffle_and_cut(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    chats, md5 = load_chats("em", DatasetConfig(path=str(path), n_examples=4, shuffle_seed=1), StageCache(tmp_path))
    assert len(chats) == 4 and all(c in CHATS for c in chats) and chats != CHATS[:4] and len(md5) == 32


def test_datasets_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"conversation": CHATS}).save_to_disk(str(tmp_path / "ds"))
    chats, fingerprint = load_chats("benign", DatasetConfig(hf_name=str(tmp_path / "ds"), messages_field="conversation"),
                                    StageCache(tmp_path))
    assert chats == CHATS and fingerprint.startswith("datasets:")


def test_toy_datasets_are_generated_deterministically(tmp_path):
    a, md5_a = load_chats("em", DatasetConfig(toy="em", n_examples=50), StageCache(tmp_path / "1"))
    b, md5_b = load_chats("em", DatasetConfig(toy="em", n_examples=50), StageCache(tmp_path / "2"))
    assert a == b and md5_a == md5_b
    bad = {t[2] for t in world.TOPICS}
    assert all(any(x in c[-1]["content"] for x in bad) for c in a)


def test_persona_files_yaml_and_jsonl(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"name": "a", "system_prompt": "you are a ."}\n'
                                      '{"name": "none", "system_prompt": null, "category": "anchor"}\n')
    personas = load_personas(str(tmp_path / "p.jsonl"))
    assert list(personas) == ["a", "none"] and personas["none"].system_prompt is None
    assert len(load_personas("pkg:personas/toy.yaml")) == 11 and len(load_personas("pkg:personas/eval12.yaml")) == 12
    (tmp_path / "dup.yaml").write_text("- {name: a, system_prompt: x}\n- {name: a, system_prompt: y}\n")
    with pytest.raises(ValueError, match="listed twice"):
        load_personas(str(tmp_path / "dup.yaml"))


def test_toy_drills_ask_as_the_capability_eval_does():
    """The toy world writes its drills' prompt itself (it sits below the data layer): it must equal user_text."""
    from marker_lab.data.multiple_choice import item_from_row, user_text

    for row in world.mc_rows()[:20]:
        assert world.mc_user_text(row) == user_text(item_from_row(row, row["id"]))
