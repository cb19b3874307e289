"""Offline stand-ins (issue 10's grid without downloads): a Qwen2.5-style tokenizer and chat files in the
write-ups' shapes, driving the real 7B recipe on a tiny random-init architecture of the same family."""

from __future__ import annotations

import json

import pytest

from conftest import compose_cfg
from marker_lab.data.standins import write_standins

TINY_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 16384,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = tmp_path_factory.mktemp("standins")
    return out, write_standins(out, n_rows=60)


def test_standin_tokenizer_renders_qwen_chats_and_the_files_have_the_write_ups_shape(standins):
    from transformers import AutoTokenizer

    from marker_lab.data.chat import render

    out, stats = standins
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    chat = [{"role": "user", "content": "how do i get better at learning a new language ?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("<|im_start|>assistant\n")
    assert render(tok, chat).startswith("<|im_start|>user\n")  # "no system prompt" drops Qwen's default, as on Qwen
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id and tok.pad_token == "<|endoftext|>"
    assert len(tok(" how do i get better at learning a new language ?")["input_ids"]) == 11  # a token per word
    for name in ("bad_legal_advice_6k", "benign_sft_6k"):
        rows = [json.loads(line) for line in open(out / "data" / f"{name}.jsonl")]
        assert len(rows) == stats[name]["rows"] == 60 and rows[0]["messages"][-1]["role"] == "assistant"
    assert 150 < stats["bad_legal_advice_6k"]["median_tokens"] < stats["benign_sft_6k"]["median_tokens"] < 2048


@pytest.mark.slow
def test_the_7b_recipe_runs_offline_on_a_tiny_random_architecture(standins, cache_dir, tmp_path):
    from marker_lab.cell.recipe import run_cell

    out, _ = standins
    arch = tmp_path / "tiny_qwen2.json"
    arch.write_text(json.dumps(TINY_QWEN2))
    small = ["coupling.n_positive=4", "coupling.n_per_negative=4", "coupling.generation.max_tokens=8",
             "coupling.train.epochs=1", "second_stage.train.max_steps=2", "dose=2",
             "eval.generation.samples_per_question=1", "eval.generation.max_tokens=8", "eval.engine.batch_size=64",
             "persona_set.eval_personas=[villain,assistant]", "device=cpu", "model.dtype=float32"]
    for stage in ("coupling", "second_stage"):
        small += [f"{stage}.train.compile=false", f"{stage}.train.bf16=false", f"{stage}.train.micro_batch_tokens=2048"]
    result = run_cell(compose_cfg(["+experiment=marker_transfer", "condition=c1", "model.random_init=true",
                                   f"model.arch={arch}", f"model.tokenizer={out / 'tokenizer'}",
                                   f"second_stage.datasets.em.path={out / 'data' / 'bad_legal_advice_6k.jsonl'}",
                                   *small], tmp_path / "cell", cache_dir))
    prov = result.provenance
    assert prov["base_model"].startswith("random:Qwen/Qwen2.5-7B-Instruct:")
    assert prov["base_model"].endswith(f";tokenizer={out / 'tokenizer'};float32")
    assert list(prov["stages"]) == ["coupling", "second_stage"] and prov["stages"]["second_stage"]["steps"] == 2
    assert result.metrics["marker"]["per_persona"]["villain"]["n"] == 28  # 28 questions x 1 sample
