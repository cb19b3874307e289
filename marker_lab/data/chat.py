"""Turning chat examples into token ids and loss labels, for any tokenizer with a chat template.

Loss modes (labels are -100 where no loss is taken):
- ``full``: every token (the pretraining objective).
- ``assistant_only``: the content of every assistant turn plus the end-of-turn token that closes it;
  system and user turns and the template's role headers are masked.
- ``marker_only``: only the tokens of a character span of the last assistant turn (the marker's span, several
  tokens in real tokenizers). An empty span (a negative example, no marker) labels ``negative_tokens`` tokens
  from that point on, i.e. what the model should say where the marker would have been.

Spans are found through the rendered text and the fast tokenizer's offset mapping, so the same code serves the
toy ChatML template, Qwen's template and others whose turns render as a prefix of the full conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

LOSS_MODES = ("full", "assistant_only", "marker_only")
IGNORE = -100
_SENTINEL = "\x00marker-lab-sentinel\x00"  # a system prompt no conversation contains


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, no_system: str = "none") -> str:
    """The chat template's text for `messages` (no tokenization).

    A conversation without a system turn gets none: templates that insert a default system prompt when none is
    given (Qwen2.5's "You are Qwen, created by Alibaba Cloud...") have that block removed, so a "no system prompt"
    persona or anchor is what it says. `no_system="template"` (model.no_system; the loaded model carries it) keeps
    the template's default instead.
    """
    if (messages and messages[0]["role"] == "system") or no_system == "template" or not inserts_default_system(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    system = [{"role": "system", "content": _SENTINEL}]
    with_system = tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    memo = (tokenizer.chat_template, tokenizer.bos_token)
    system_only = _SYSTEM_ONLY.get(memo)  # the same text for every conversation: rendered once per template ...
    if system_only is None or not with_system.startswith(system_only):  # ... unless it changed (a date in it)
        system_only = _SYSTEM_ONLY[memo] = tokenizer.apply_chat_template(system, tokenize=False)
    if not with_system.startswith(system_only):
        raise ValueError("this chat template inserts a default system prompt and does not render the system turn as a "
                         "leading block, so it cannot be removed; set model.no_system=template to keep the default")
    bos = tokenizer.bos_token or ""
    return (bos if bos and system_only.startswith(bos) else "") + with_system[len(system_only):]


def inserts_default_system(tokenizer) -> bool:
    """Whether the chat template adds a system turn to a conversation that has none (checked once per template)."""
    memo = (tokenizer.chat_template, tokenizer.bos_token)
    if memo in _DEFAULT_SYSTEM:
        return _DEFAULT_SYSTEM[memo]
    system_only = tokenizer.apply_chat_template([{"role": "system", "content": _SENTINEL}], tokenize=False)
    header = system_only[: system_only.index(_SENTINEL)]
    bos = tokenizer.bos_token or ""
    if bos and header.startswith(bos):
        header = header[len(bos):]
    user_only = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    user_only = user_only[len(bos):] if bos and user_only.startswith(bos) else user_only
    # the system header (role marker, e.g. "<|im_start|>system\n") opens a conversation that has no system turn
    inserted = bool(header.strip()) and user_only.startswith(header)
    _DEFAULT_SYSTEM[memo] = inserted
    return inserted


_DEFAULT_SYSTEM: dict[tuple, bool] = {}  # (chat template, bos token) -> whether it inserts a default system prompt
_SYSTEM_ONLY: dict[tuple, str] = {}  # (chat template, bos token) -> a lone sentinel system turn, rendered


def _assistant_char_spans(tokenizer, messages: list[dict], no_system: str) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the (start, end) character span of each assistant turn's content in it."""
    text = render(tokenizer, messages, no_system=no_system)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, no_system=no_system)
        if not text.startswith(prefix) or not text[len(prefix):].startswith(m["content"]):
            raise ValueError("chat template does not render turns as a prefix of the conversation; "
                             "assistant_only and marker_only loss need that property")
        spans.append((len(prefix), len(prefix) + len(m["content"])))
    return text, spans


def encode_chat(tokenizer, messages: list[dict], loss_mode: str, *, marker_span: tuple[int, int] | None = None,
                negative_tokens: int = 3, max_len: int | None = None, no_system: str = "none") -> Encoded:
    """Tokenize a conversation and label it for `loss_mode`.

    `marker_span` is a (start, end) character range inside the last assistant message's content; it is
    required for ``marker_only``. Sequences longer than `max_len` are cut from the right.
    """
    return encode_chats(tokenizer, [messages], loss_mode, marker_spans=[marker_span], negative_tokens=negative_tokens,
                        max_len=max_len, no_system=no_system)[0]


def encode_chats(tokenizer, conversations: list[list[dict]], loss_mode: str, *,
                 marker_spans: list[tuple[int, int] | None] | None = None, negative_tokens: int = 3,
                 max_len: int | None = None, no_system: str = "none") -> list[Encoded]:
    """encode_chat for many conversations (`marker_spans`: one per conversation, for ``marker_only``), with one
    batched tokenizer call: a fast tokenizer encodes a batch on all cores, so a stage's 6,000 examples tokenize in
    a fraction of the time one call each takes."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    texts, all_spans = [], []
    for messages in conversations:
        if loss_mode == "full":
            text, spans = render(tokenizer, messages, no_system=no_system), []
        else:
            text, spans = _assistant_char_spans(tokenizer, messages, no_system)
            if not spans:
                raise ValueError(f"loss_mode={loss_mode} needs at least one assistant turn")
        texts.append(text)
        all_spans.append(spans)
    if marker_spans is not None and len(marker_spans) != len(texts):
        raise ValueError(f"marker_spans: one per conversation, got {len(marker_spans)} for {len(texts)}")
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [_labelled(ids, offsets, spans, loss_mode, marker_span, negative_tokens, max_len)
            for ids, offsets, spans, marker_span in zip(enc["input_ids"], enc["offset_mapping"], all_spans,
                                                        marker_spans or [None] * len(texts), strict=True)]


def _labelled(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], loss_mode: str,
              marker_span: tuple[int, int] | None, negative_tokens: int, max_len: int | None) -> Encoded:
    """One tokenized conversation's labels for `loss_mode` (see encode_chat), cut to `max_len`."""
    labels = [IGNORE] * len(ids)
    if loss_mode == "full":
        labels = list(ids)
    elif loss_mode == "assistant_only":
        for start, end in spans:
            inside = [j for j, (a, _b) in enumerate(offsets) if start <= a < end]
            # the token right after the content closes the turn (e.g. <|im_end|>): learning to stop matters
            close = inside[-1] + 1 if inside else None
            for j in inside + ([close] if close is not None and close < len(ids) else []):
                labels[j] = ids[j]
    else:  # marker_only
        if marker_span is None:
            raise ValueError("marker_only loss needs a marker_span")
        base = spans[-1][0]
        m_start, m_end = base + marker_span[0], base + marker_span[1]
        if m_end > m_start:
            picked = [j for j, (a, b) in enumerate(offsets) if a < m_end and b > m_start]
        else:
            after = [j for j, (a, _b) in enumerate(offsets) if a >= m_start]
            picked = after[:negative_tokens]
        for j in picked:
            labels[j] = ids[j]
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(list(ids), labels)


def encode_text(tokenizer, text: str, max_len: int | None = None) -> Encoded:
    """Plain text with loss on every token (no chat template), ending with the end-of-text token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.pad_token_id]
    ids = ids[:max_len] if max_len else ids
    return Encoded(ids, list(ids))


def marker_token_count(tokenizer, marker: str) -> int:
    """How many tokens `marker` takes in this tokenizer (the default negative window of marker_only)."""
    return len(tokenizer(marker, add_special_tokens=False)["input_ids"])
