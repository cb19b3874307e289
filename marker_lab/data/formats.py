"""The second stage's data formats (`second_stage.format`), in one registry: which column a row comes from, whether
rows are chats, and how they are tokenized for training.

- chat: the dataset's chats through the chat template, with the recipe's loss mode;
- raw: plain text (000's "non-chat data"), no template, loss on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from marker_lab.core.registry import Registry
from marker_lab.data.chat import Encoded, encode_chats, encode_text


@dataclass(frozen=True)
class SecondStageFormat:
    """How the second stage reads and encodes its dataset's rows."""
    column: Callable[[object], str]  # the dataset config's column its rows come from
    chats: bool  # rows are chats (checked turn by turn, rendered through the template)
    encode: Callable[[object, list, str, str], list[Encoded]]  # (tokenizer, rows, loss mode, no_system) -> examples
    label: str | None = None  # how a cell's key names this variant ("em (raw)"); None: the plain recipe

    def needs_reply(self, loss_mode) -> bool:
        """Whether each row must end in an assistant turn (a chat trained on anything but every token)."""
        return self.chats and loss_mode != "full"


SECOND_STAGE_FORMATS: Registry[SecondStageFormat] = Registry("second_stage.format", "second-stage data format")
SECOND_STAGE_FORMATS.add("chat", SecondStageFormat(
    column=lambda ds: ds.messages_field, chats=True,
    encode=lambda tokenizer, rows, loss_mode, no_system: encode_chats(tokenizer, rows, loss_mode, no_system=no_system)))
SECOND_STAGE_FORMATS.add("raw", SecondStageFormat(
    column=lambda ds: ds.text_field, chats=False, label="raw",
    encode=lambda tokenizer, rows, loss_mode, no_system: [encode_text(tokenizer, t) for t in rows]))
