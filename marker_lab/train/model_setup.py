"""The model as the training steps run it, and as it was afterwards: gradient checkpointing, an FP8 base, decoder
layers compiled with torch.compile (one graph for every layer and step), and the attention implementation of the
steps (transformers' own, packed_attention.py's varlen, or sdpa without a mask function: CAUSAL_SDPA).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from marker_lab.config.schema import Logits, TrainConfig
from marker_lab.data.chat import Encoded
from marker_lab.train import packed_attention
from marker_lab.train.batches import varying_dims
from marker_lab.train.fp8 import fp8_base

# transformers' sdpa registered with no mask function, for the labelled padded path (training_attention)
CAUSAL_SDPA = "sdpa_causal"


def check_attention(cfg: TrainConfig, device: torch.device, desc: str) -> None:
    """Stop on a training attention that cannot run here: flex attention on CPU (no backward there), or varlen
    without packed rows (it attends within each example of a row)."""
    if cfg.attention == "flex_attention" and device.type == "cpu":
        raise ValueError(f"{desc}: train.attention=flex_attention: flex attention has no backward on CPU")
    if cfg.attention == packed_attention.NAME and not cfg.pack:
        raise ValueError(f"{desc}: train.attention=varlen attends within each example of a packed row: set train.pack")


@contextmanager
def attention_implementation(model, name: str):
    """Run `model` with attention implementation `name` (a transformers name, or ours: packed_attention.NAME,
    CAUSAL_SDPA), then restore."""
    if name == packed_attention.NAME:
        packed_attention.register()
    elif name == CAUSAL_SDPA:
        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def training_attention(model, cfg: TrainConfig) -> str | None:
    """The attention the steps run on, when not the model's own: `train.attention` if set; else, on the labelled,
    padded path of a model on sdpa whose every layer attends causally to all before it, transformers' sdpa under
    CAUSAL_SDPA. That path drops the padding mask anyway (sft.token_loss_sum), so sdpa runs causal without a mask either
    way; registered with no mask function, transformers also skips its packed-rows check on the position ids, which
    reads the device: a host sync per forward. A model with sliding-window or chunked layers keeps its own (their
    masks are more than causal)."""
    if cfg.attention:
        return cfg.attention
    config = model.config
    plain_causal = (getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None)
                    is None and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"})
    if not cfg.pack and cfg.logits == Logits.labelled and config._attn_implementation == "sdpa" and plain_causal:
        return CAUSAL_SDPA
    return None


def compile_layers(model, undo: bool = False, dynamic_dims: tuple[int, ...] = ()) -> None:
    """torch.compile each decoder layer for training (one graph serves every layer), or restore eager layers.

    Regional compilation: the layers share code, so the compile costs about one layer's worth, and fuses the
    elementwise work (norms, rotary, activation, LoRA dropout and adds) that eager mode runs as separate kernels.
    `dynamic_dims` (0: batch, 1: sequence) are the dims that vary over the run (`varying_dims`): compiled symbolic
    from the first step, instead of a static graph first and a recompile when a second shape comes.
    """
    decoder, _ = split_lm(model)
    for layer in decoder.layers:
        if undo:
            layer.__dict__.pop("forward", None)  # the class's eager forward again
            continue
        compiled = torch.compile(layer.forward, dynamic=None)
        layer.forward = _marking_dynamic(compiled, dynamic_dims) if dynamic_dims else compiled


def _marking_dynamic(compiled: Callable, dims: tuple[int, ...]) -> Callable:
    """`compiled`, called with `dims` of the hidden states marked dynamic, and every dim of another tensor argument
    whose size is one of those sizes (the rotary cos/sin, position ids, a 4-d mask), and 1-d ones (a packed row's
    example offsets): a size left static would pin the symbolic one it equals."""

    def forward(hidden_states, *args, **kwargs):
        if not torch.compiler.is_compiling():  # a compiled caller (an engine's whole-model graph) traces it as is
            varying = {hidden_states.shape[d] for d in dims}
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(hidden_states, d)
            for t in _tensors((args, kwargs)):
                for i, n in enumerate(t.shape):
                    if n > 1 and (n in varying or t.dim() == 1):
                        torch._dynamo.maybe_mark_dynamic(t, i)
        return compiled(hidden_states, *args, **kwargs)

    return forward


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def split_lm(model):
    """(decoder returning last_hidden_state, LM head) of a causal LM, through any peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"{cfg.model_type}: logits are post-processed after the LM head; use train.logits=all")
    return base.get_decoder(), base.get_output_embeddings()


@contextmanager
def training_setup(model, cfg: TrainConfig, plan: list[list[list[Encoded]]]):
    """The model as the steps need it (gradient checkpointing, the first layer's input requiring grad, an FP8 base,
    compiled layers, the training attention, train mode), and as it was afterwards, also when a step raises. Yields
    the training attention's name (None: the model's own)."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers (5.24 at least) adds its own input-grad hook, active in any grad mode: ours below replaces it
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()
    # the first layer's input requires grad like every other layer's (checkpointing needs it; under compile one graph
    # then serves every layer, else the first compiles its own). The extra work: that layer's input-side gradients
    # (norm, q/k/v) and a gradient held on the embedding output, all unused
    hook = (model.get_input_embeddings().register_forward_hook(_input_requires_grad)
            if cfg.gradient_checkpointing or cfg.compile else None)
    try:
        attention = training_attention(model, cfg)
        # the FP8 base goes in before the layers compile (they trace it), and comes out before they merge or save
        with fp8_base(model) if cfg.fp8_base else nullcontext(), \
                attention_implementation(model, attention) if attention else nullcontext():
            if cfg.compile:
                compile_layers(model, dynamic_dims=varying_dims(plan, cfg.pack))
            model.train()
            yield attention
    finally:
        model.eval()
        if cfg.compile:
            compile_layers(model, undo=True)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        if hook is not None:
            hook.remove()


def _input_requires_grad(module, inputs, output) -> None:
    """Forward hook on the input embeddings: their output requires grad, in grad mode only (a no-grad pass, an
    eval or the KL term's reference, keeps one graph for all its layers too)."""
    if torch.is_grad_enabled():
        output.requires_grad_(True)
