"""A stage's LoRA adapter (peft): a fresh, seeded one added to the model, beside any adapters earlier stages
stacked on it; only the new one trains (sft.train trains what requires grad).
"""

from __future__ import annotations

import warnings

import torch

from marker_lab.config.schema import LoraConfig

# peft 0.21.2 (the newest) reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__: a warning
# per adapter, every run; no call of ours reads it. Only that message is ignored; remove once peft stops reading it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def apply_lora(model, lora: LoraConfig, seed: int, adapter_name: str = "default"):
    """Add a fresh, seeded LoRA adapter (peft); only it trains.

    On a model that already carries adapters (stacked stages), the new one is added beside them; all stay
    active in the forward pass and the earlier ones are frozen.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    if not isinstance(model, PeftModel):
        return get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    model.add_adapter(adapter_name, peft_cfg)
    names = list(model.peft_config)
    model.base_model.set_adapter(names)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{adapter_name}." in n)
    return model
