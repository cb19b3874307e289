"""Decode-step attention for grouped-query models, registered with transformers as `sdpa_gqa`.

Stock sdpa in transformers copies every key/value head `num_key_value_groups` times (`repeat_kv`) whenever there
is a padding mask and the forward is compiled. At decode on the static cache that copy, not the matmuls, is most
of a step: on Qwen2.5-7B (28 query heads, 4 key/value heads) at 1,030 sequences it was ~55 of ~83 ms
(docs/benchmarks.md). Here a single query token's heads are regrouped as (key/value head, group) so one sdpa call
reads each key/value head once; the same arithmetic, no copies. Prefill (more than one query token) is stock sdpa.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B, H, Q, D), key/value (B, KV, L, D) -> output (B, Q, H, D)."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None and attention_mask.shape[1] != 1:  # a per-head mask cannot be regrouped
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # head h uses key/value head h // groups (transformers' repeat_kv layout), so (B, H, 1, D) -> (B, KV, groups, D)
    # puts each key/value head's query heads in the "query position" slot; the (B, 1, 1, L) mask broadcasts
    q = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `sdpa_gqa` with transformers (idempotent); returns its name for `set_attn_implementation`."""
    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
