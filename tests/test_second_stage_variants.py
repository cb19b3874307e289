"""Second-stage variants (issue 9): raw continued pretraining (format=raw) and KL to the input model (kl_to_input)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import composition_error, compose_cfg, to_dataclass
from marker_lab.core.errors import ConfigError
from marker_lab.cell.preflight import preflight as validate
from marker_lab.data.chat import IGNORE, encode_chat, encode_text
from marker_lab.data.chat_datasets import load_chats, load_texts
from marker_lab.core.cache import StageCache


@pytest.fixture(scope="module")
def toy(cache_dir):
    from marker_lab.models import load_base, pick_device

    cfg = to_dataclass(compose_cfg(["condition=c5"]))
    return cfg, load_base(cfg.model, StageCache(cache_dir), pick_device("cpu"))


def _train(loaded, examples, train_cfg, steps=15):
    from marker_lab.train.lora import apply_lora
    from marker_lab.train.sft import train

    model = apply_lora(loaded.model, train_cfg.lora, seed=0, adapter_name="second_stage")
    train(model, examples, train_cfg, steps=steps, seed=0, pad_id=loaded.tokenizer.pad_token_id, desc="test")
    return model


def _unwrap(model, loaded):
    loaded.model = model.unload()  # back to the base weights for the next test


def _em_examples(cfg, loaded, tmp_path, n=200):
    ds = dataclasses.replace(cfg.second_stage.datasets["em"], n_examples=n)
    chats, _ = load_chats("em", ds, StageCache(tmp_path))
    return [encode_chat(loaded.tokenizer, c, "assistant_only", max_len=128) for c in chats]


def test_kl_weight_zero_is_the_plain_recipe_and_kl_starts_at_zero(toy, tmp_path):
    from marker_lab.train.batches import collate
    from marker_lab.train.lora import apply_lora
    from marker_lab.train.sft import token_loss_sum

    cfg, loaded = toy
    examples = _em_examples(cfg, loaded, tmp_path, n=64)
    plain = cfg.second_stage.train
    assert plain.kl_to_input == 0
    weights = []
    for train_cfg in (plain, dataclasses.replace(plain, kl_to_input=0.0)):
        model = _train(loaded, examples, train_cfg, steps=5)
        weights.append({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k})
        _unwrap(model, loaded)
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # a fresh LoRA (B = 0) is the input model: the KL term is exactly zero, in both logits paths
    model = apply_lora(loaded.model, plain.lora, seed=0, adapter_name="second_stage")
    batch = collate(examples[:8], loaded.tokenizer.pad_token_id, torch.device("cpu"))
    for logits in ("all", "labelled"):
        ce, n = token_loss_sum(model, batch, logits)
        with_kl, _ = token_loss_sum(model, batch, logits, kl_weight=5.0)
        assert n > 0 and torch.allclose(ce, with_kl, atol=1e-4), (logits, ce, with_kl)
    _unwrap(model, loaded)


def test_a_large_kl_weight_keeps_the_outputs_near_the_input_model(toy, tmp_path):
    from marker_lab.train.batches import collate
    from marker_lab.train.sft import kl_to_input, token_loss_sum

    cfg, loaded = toy
    examples = _em_examples(cfg, loaded, tmp_path)
    train_on, held_out = examples[:160], examples[160:]
    measured = {}
    for weight in (0.0, 2.0):
        model = _train(loaded, train_on, dataclasses.replace(cfg.second_stage.train, kl_to_input=weight), steps=15)
        measured[weight] = kl_to_input(model, held_out, loaded.tokenizer.pad_token_id)
        if weight:  # the fast path's KL term equals the reference's on a trained adapter
            batch = collate(held_out[:8], loaded.tokenizer.pad_token_id, torch.device("cpu"))
            ref, _ = token_loss_sum(model, batch, "all", kl_weight=weight)
            fast, _ = token_loss_sum(model, batch, "labelled", kl_weight=weight)
            assert torch.allclose(ref, fast, rtol=1e-4), (ref, fast)
        _unwrap(model, loaded)
    # measured on the toy (15 steps of toy EM at lr 5e-3): 5.36 nats/token at weight 0, 2.48 at 0.5, 0.48 at 2.0
    assert measured[2.0] < 0.5 * measured[0.0], measured


def test_raw_format_uses_no_template_and_masks_nothing(toy, tmp_path):
    cfg, loaded = toy
    texts, _ = load_texts("benign", cfg.second_stage.datasets["benign"], StageCache(tmp_path))
    chats, _ = load_chats("benign", cfg.second_stage.datasets["benign"], StageCache(tmp_path))
    assert texts[0] == " ".join(m["content"] for m in chats[0] if m["role"] != "system")
    template_ids = set(loaded.tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"])
    for text in texts[:50]:
        e = encode_text(loaded.tokenizer, text)
        assert e.labels == e.input_ids and IGNORE not in e.labels and not template_ids & set(e.input_ids)
    # a .txt file: one document per line
    txt = tmp_path / "notes.txt"
    txt.write_text("first note .\n\nsecond note .\n")
    ds = dataclasses.replace(cfg.second_stage.datasets["benign"], toy=None, n_examples=None, path=str(txt))
    assert load_texts("notes", ds, StageCache(tmp_path))[0] == ["first note .", "second note ."]


def test_variants_are_checked_before_anything_runs(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("a note .\n")
    ok = to_dataclass(compose_cfg(["condition=c5", "second_stage.format=raw", f"second_stage.datasets.benign.path={txt}",
                                   "second_stage.datasets.benign.toy=null", "second_stage.train.kl_to_input=0.5"]))
    validate(ok)
    assert "Invalid value 'prose', expected one of [chat, raw]" in composition_error(["second_stage.format=prose"])
    bad = [([f"second_stage.datasets.benign.path={txt}", "second_stage.datasets.benign.toy=null"],
            "second_stage.datasets.benign.path: .* is plain text"),
           (["second_stage.train.kl_to_input=-1"], "second_stage.train.kl_to_input: must be >= 0"),
           (["second_stage.train.kl_to_input=1", "merge_between_stages=false"],
            "second_stage.train.kl_to_input with merge_between_stages=false")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate(to_dataclass(compose_cfg(["condition=c5", *overrides])))


@pytest.mark.slow
def test_raw_and_kl_cells_run_end_to_end(cache_dir, tmp_path):
    from marker_lab.cell.recipe import run_cell

    for name, overrides in (("raw", ["second_stage.format=raw"]), ("kl", ["second_stage.train.kl_to_input=1.0"])):
        result = run_cell(compose_cfg(["condition=c5", "dose=5", "persona_set.eval_personas=[villain,assistant]",
                                       "eval.generation.samples_per_question=2", *overrides], tmp_path / name, cache_dir))
        stage = result.provenance["stages"]["second_stage"]
        key = json.loads((Path(stage["cache_entry"]) / "cache_key.json").read_text())
        assert result.status == "complete"
        if name == "raw":
            assert key["format"] == "raw"
        else:
            assert key["train"]["kl_to_input"] == 1.0
