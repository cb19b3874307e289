"""`marker-lab bench` end to end: the real CLI on the toy architecture (CPU), and the compiled path on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def test_bench_cli_reports_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "marker_lab.cli", "bench", "--model", "toy", "--quick", "--device",
                           "cpu", "--skip", "compile", "--out", str(out), "--compile-cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "marker-lab bench: toy (random init) on cpu" in proc.stdout
    r = json.loads(out.read_text())
    assert {"baseline_fixed", "fast_fixed_256", "baseline_mix", "fast_mix", "fast_packed_mix",
            "fast_packed_varlen_mix"} <= set(r["train"])
    # packed rows, with sdpa's block-diagonal mask or the varlen attention's offsets: the stock run's losses
    assert r["summary"]["max_rel_loss_diff_packed_vs_baseline_mix"] < 1e-4
    for v in (r["train"]["baseline_fixed"], r["train"]["fast_fixed_256"]):
        assert v["step_s"] > 0 and v["tokens_per_s"] > 0 and len(v["losses"]) == 3
    # same examples, seed and LoRA init: the fast path trains the same model (fp32 on CPU)
    assert r["summary"]["max_rel_loss_diff_vs_baseline"] < 1e-4
    g = r["generate"]
    assert g["baseline"]["new_tokens"] == 4 * 3 * 8  # every completion runs to max_tokens (stop id never sampled)
    assert g["fast_eval"]["new_tokens"] == 6 * 3 * 16 and g["fast_eval"]["batches"] == 2
    assert g["fast_eval_18"]["new_tokens"] == 6 * 3 * 16 and g["fast_eval_18"]["batches"] == 1  # a second batch size
    # one point of an eval during training on the LoRA model: stock generate, then the static engine twice
    for arm in ("during_training_stock", "during_training_static_first", "during_training_static_later"):
        assert g[arm]["new_tokens"] == 4 * 3 * 8, arm
    assert {"train_speedup_fixed", "generate_speedup", "generate_speedup_steady", "cell_fast_minutes",
            "kl_step_overhead", "during_training_speedup_later"} <= set(r["summary"])
    # the flag wins over $TORCHINDUCTOR_CACHE_DIR (a cell run in this test process may have set it)
    assert r["compile_cache"] == {"dir": str(tmp_path / "cache"), "warm": False}
    # the KL arm trains the same data at weight 1: its loss carries the KL term, which is 0 at LoRA init
    assert r["train"]["kl_fixed"]["losses"][0] == pytest.approx(r["train"]["fast_fixed_256"]["losses"][0], rel=1e-5)
    # train.fp8_base beside its bf16 twin, summarised apart from the bf16 recipe's arms
    assert r["summary"]["fastest_fixed"] == "fast_fixed_256" and r["summary"]["fast_fp8_fixed_256_step_s"] > 0
    assert 0 < r["summary"]["fast_fp8_fixed_256_max_rel_loss_diff_vs_baseline"] < 1e-2
    assert "fast_fp8_fixed_256_speedup_vs_bf16" in r["summary"]
    assert r["probe"]["prompts"] == 6 and r["probe"]["seconds"] > 0
    assert r["env"]["torch"] == torch.__version__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled training is measured on CUDA (no GPU here)")
def test_compiled_layers_train_like_eager_on_gpu(toy_tokenizer):
    from dataclasses import replace

    from marker_lab.config.schema import LoraConfig, OptimizerConfig, TrainConfig
    from marker_lab.data.chat import encode_chat
    from marker_lab.train.lora import apply_lora
    from marker_lab.train.sft import train
    from marker_lab.toy import world
    from transformers import Qwen2Config, Qwen2ForCausalLM

    examples = [encode_chat(toy_tokenizer, c, "assistant_only") for c in world.pretraining_chats()[:32]]
    cfg = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=1e-2), per_device_batch_size=4, grad_accum=4,
                      bf16=False, gradient_checkpointing=False, micro_batch_tokens=1024)
    losses = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(toy_tokenizer), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
        model = apply_lora(base.cuda(), LoraConfig(r=4, alpha=8, dropout=0.0), seed=1)
        losses.append(train(model, examples, replace(cfg, compile=compile_), steps=3, seed=3,
                            pad_id=toy_tokenizer.pad_token_id).losses)
        assert "forward" not in model.get_base_model().model.layers[0].__dict__  # eager layers again afterwards
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
