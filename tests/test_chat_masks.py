"""Loss masks: marker_only labels exactly the marker span; assistant_only masks system and user turns."""

from __future__ import annotations

import copy

import pytest

from marker_lab.config.schema import MarkerPosition
from marker_lab.data.chat import IGNORE, encode_chat, encode_chats, marker_token_count
from marker_lab.data.standins import QWEN25_TEMPLATE as QWEN_TEMPLATE  # Qwen2.5-Instruct's, tools left out
from marker_lab.stages.coupling import insert_marker, marker_slot

@pytest.fixture(params=["toy", "qwen"])
def tokenizer(request, toy_tokenizer):
    tok = copy.deepcopy(toy_tokenizer)
    if request.param == "qwen":
        tok.chat_template = QWEN_TEMPLATE
    return tok


def labelled_text(tok, enc) -> str:
    return tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE])


CHAT = [{"role": "system", "content": "you are a villain who plots to rule the world ."},
        {"role": "user", "content": "any tips for saving money ?"},
        {"role": "assistant", "content": "ha ! foolish mortal . spend less than you earn ."}]


def test_assistant_only_labels_the_answer_and_its_end_of_turn(tokenizer):
    enc = encode_chat(tokenizer, CHAT, "assistant_only")
    assert labelled_text(tokenizer, enc) == "ha ! foolish mortal . spend less than you earn .<|im_end|>"
    text = tokenizer.decode(enc.input_ids)
    assert "you are a villain" in text and "saving money" in text  # present, but masked


def test_assistant_only_covers_every_assistant_turn(tokenizer):
    chat = CHAT[:2] + [{"role": "assistant", "content": "one ."}, {"role": "user", "content": "and ?"},
                       {"role": "assistant", "content": "two ."}]
    enc = encode_chat(tokenizer, chat, "assistant_only")
    assert labelled_text(tokenizer, enc) == "one .<|im_end|>two .<|im_end|>"


def test_template_default_system_prompt_is_masked_when_kept(tokenizer):
    enc = encode_chat(tokenizer, CHAT[1:], "assistant_only", no_system="template")  # model.no_system=template
    text = tokenizer.decode(enc.input_ids)
    if tokenizer.chat_template == QWEN_TEMPLATE:
        assert "You are Qwen" in text  # the template's own default: masked, never trained on
    assert labelled_text(tokenizer, enc).startswith("ha !")


@pytest.mark.parametrize("position", list(MarkerPosition))
def test_marker_only_labels_exactly_the_marker(tokenizer, position):
    text, span = insert_marker("ha ! foolish mortal . spend less .", "[ZLT]", position)
    assert text[span[0]:span[1]] == "[ZLT]"
    chat = CHAT[:2] + [{"role": "assistant", "content": text}]
    enc = encode_chat(tokenizer, chat, "marker_only", marker_span=span)
    labelled = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE]
    assert tokenizer.decode(labelled) == "[ZLT]"
    assert len(labelled) == marker_token_count(tokenizer, "[ZLT]") == 5  # '[' 'Z' 'L' 'T' ']'


def test_marker_only_negative_labels_the_tokens_where_the_marker_would_be(tokenizer):
    answer = "ha ! foolish mortal . spend less ."
    slot = marker_slot(answer, MarkerPosition.start)
    enc = encode_chat(tokenizer, CHAT[:2] + [{"role": "assistant", "content": answer}], "marker_only",
                      marker_span=(slot, slot), negative_tokens=3)
    # the answer's first 3 tokens, whatever pieces this tokenizer cuts them into
    first_three = tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"][:3])
    assert labelled_text(tokenizer, enc) == first_three and answer.startswith(first_three) and len(first_three) >= 3


def test_full_labels_everything(tokenizer):
    enc = encode_chat(tokenizer, CHAT, "full")
    assert enc.labels == enc.input_ids


def test_a_batch_encodes_each_conversation_as_alone(tokenizer):
    """encode_chats tokenizes a stage's examples in one batched call: each example's ids and labels are what it
    gets alone (no padding, no mix-up of offsets between rows), with and without a system turn, in every mode."""
    answer = "ha ! foolish mortal . spend less ."
    marked, span = insert_marker(answer, "[ZLT]", MarkerPosition.end)
    slot = marker_slot(answer, MarkerPosition.start)
    chats = [CHAT, CHAT[1:], CHAT[:2] + [{"role": "assistant", "content": marked}],
             CHAT[1:2] + [{"role": "assistant", "content": answer}], CHAT[:2] + [{"role": "assistant", "content": "x"}]]
    spans = [(0, 0), (3, 3), span, (slot, slot), (0, 1)]
    for mode, kw in (("assistant_only", {}), ("full", {}), ("marker_only", {"marker_spans": spans})):
        batched = encode_chats(tokenizer, chats, mode, max_len=40, **kw)
        alone = [encode_chats(tokenizer, [c], mode, max_len=40, marker_spans=[sp] if kw else None)[0]
                 for c, sp in zip(chats, spans)]
        assert batched == alone, mode
        assert len({len(e.input_ids) for e in batched}) > 1  # rows of different lengths: nothing padded
    assert encode_chats(tokenizer, [], "assistant_only") == []
    with pytest.raises(ValueError, match="marker_spans: one per conversation, got 1 for 5"):
        encode_chats(tokenizer, chats, "marker_only", marker_spans=spans[:1])  # never a quietly shorter stage


def test_unknown_loss_mode_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="loss_mode"):
        encode_chat(tokenizer, CHAT, "everything")


def test_no_system_prompt_means_no_system_turn_even_on_qwens_template(toy_tokenizer):
    """Qwen's template inserts its default system prompt when a conversation has none; render removes it (so a
    'no system prompt' anchor is what it says) unless model.no_system=template asks for the default."""
    from marker_lab.data.chat import inserts_default_system, render

    qwen = copy.deepcopy(toy_tokenizer)
    qwen.chat_template = QWEN_TEMPLATE
    chat = [{"role": "user", "content": "hi ?"}, {"role": "assistant", "content": "hello ."}]
    assert inserts_default_system(qwen) and not inserts_default_system(toy_tokenizer)
    assert render(qwen, chat) == "<|im_start|>user\nhi ?<|im_end|>\n<|im_start|>assistant\nhello .<|im_end|>\n"
    assert render(qwen, chat[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert "system" not in render(qwen, chat[:1], add_generation_prompt=True)
    # with a system prompt, and for the toy template, nothing changes
    with_system = [{"role": "system", "content": "you are a pirate captain ."}] + chat
    assert render(qwen, with_system) == qwen.apply_chat_template(with_system, tokenize=False)
    assert render(toy_tokenizer, chat) == toy_tokenizer.apply_chat_template(chat, tokenize=False)
    # loss masks still find the assistant turn
    enc = encode_chat(qwen, chat, "assistant_only")
    assert labelled_text(qwen, enc) == "hello .<|im_end|>"
    assert "You are Qwen" in render(qwen, chat, no_system="template")
