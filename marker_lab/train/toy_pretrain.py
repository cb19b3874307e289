"""Build the toy model: corpus -> tokenizer -> a tiny Qwen2 -> pretraining with the project's SFT loop.

Deterministic for a given `ToyModelConfig`; `marker_lab.models` caches the result under the stage cache.
Run by hand: `python -m marker_lab.train.toy_pretrain /tmp/toy` (prints the style accuracy it reaches).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from marker_lab.config.schema import LossMode, ScheduleConfig, Schedule, TrainConfig, OptimizerConfig, ToyModelConfig
from marker_lab.data.chat import encode_chat, encode_text
from marker_lab.train.sft import train
from marker_lab.toy import world
from marker_lab.toy.tokenizer import CHATML_TEMPLATE, build_tokenizer

log = logging.getLogger(__name__)


def _render(messages: list[dict]) -> str:
    import jinja2

    return jinja2.Template(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=False)


def toy_arch(cfg: ToyModelConfig, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None) -> Qwen2Config:
    """The toy model's architecture: a tiny Qwen2."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       intermediate_size=cfg.intermediate_size, max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)


def build_toy_model(cfg: ToyModelConfig, out_dir: Path) -> None:
    """Pretrain the toy model and save it (weights + tokenizer) to `out_dir`."""
    torch.manual_seed(cfg.seed)
    chats = world.pretraining_chats(seed=cfg.seed)
    lines = world.tagged_lines(seed=cfg.seed)
    tokenizer = build_tokenizer([_render(c) for c in chats] + lines, vocab_size=cfg.vocab_size)
    examples = [encode_chat(tokenizer, c, "full") for c in chats] + [encode_text(tokenizer, s) for s in lines]
    model = Qwen2ForCausalLM(toy_arch(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))
    recipe = TrainConfig(lora=None, optimizer=OptimizerConfig(lr=cfg.pretrain_lr, weight_decay=0.01),
                         schedule=ScheduleConfig(name=Schedule.cosine, warmup_ratio=0.05),
                         per_device_batch_size=cfg.pretrain_batch_size, grad_accum=1, grad_clip=1.0,
                         bf16=False, gradient_checkpointing=False, loss_mode=LossMode.full)
    log.info("pretraining the toy model: %d sequences, %d steps", len(examples), cfg.pretrain_steps)
    train(model, examples, recipe, steps=cfg.pretrain_steps, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
          desc="toy pretrain")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build_toy_model(ToyModelConfig(), Path(sys.argv[1]))
