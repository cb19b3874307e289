"""What cutting a stage's examples to `max_seq_len` does to them: counted before training, recorded, governed.

Examples are tokenized whole (data/chat.py), then `fit_to_length` counts the examples longer than the limit, the
labelled tokens beyond it and the examples whose last labelled token (for chats, the end-of-turn token that closes
the reply) is lost, and applies the stage's `train.truncation` policy:

- `auto` (default): a stop when an example would lose every labelled token; otherwise cut and keep, with a warning
  giving the share of labelled tokens lost;
- `error`: a stop when any example would lose a labelled token;
- `drop`: examples that would lose a labelled token are left out (counted);
- `keep`: every example is cut and kept; one left with no labelled token is left out (counted: it trains nothing).

A stage left with no example is a stop whatever the policy, and so is a coupling example whose marker labels would
be cut (`marker=True`): the coupling would train that persona on nothing. A stop is a ConfigError naming the
dataset, the count and the setting; the counts go to the log, the stage's cache entry and the result
(`provenance.stages.<stage>.truncation`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from marker_lab.core.errors import ConfigError
from marker_lab.data.chat import IGNORE, Encoded

log = logging.getLogger(__name__)


@dataclass
class TruncationReport:
    """How a stage's examples fared against its `max_seq_len` (counted on the whole tokenized examples)."""
    max_seq_len: int  # the limit
    policy: str  # train.truncation
    examples: int  # examples before any was left out
    over_limit: int  # examples longer than max_seq_len
    label_tokens: int  # labelled tokens of all examples, uncut
    label_tokens_lost: int  # labelled tokens beyond max_seq_len
    end_lost: int  # examples whose last labelled token (a chat's closing end-of-turn token) is beyond the limit
    no_label_left: int  # examples with no labelled token within the limit
    dropped: int  # examples left out (policy drop, or no labelled token left)
    longest: int  # tokens of the longest example

    @property
    def share_lost(self) -> float:
        """The share of labelled tokens beyond the limit."""
        return self.label_tokens_lost / self.label_tokens if self.label_tokens else 0.0

    def record(self) -> dict:
        """For the cache entry and the result."""
        return {**asdict(self), "share_lost": round(self.share_lost, 4)}

    def summary(self) -> str:
        """One line for the log."""
        if not self.over_limit:
            return f"all {self.examples} examples fit max_seq_len={self.max_seq_len} (longest {self.longest} tokens)"
        return (f"{self.over_limit} of {self.examples} examples exceed max_seq_len={self.max_seq_len} (longest "
                f"{self.longest} tokens): {self.label_tokens_lost} of {self.label_tokens} labelled tokens "
                f"({100 * self.share_lost:.1f}%) cut, {self.end_lost} lose their last labelled token (end of turn), "
                f"{self.no_label_left} keep none; truncation={self.policy}: {self.dropped} left out")


def labelled_count(e: Encoded, limit: int | None = None) -> int:
    """Labelled tokens of an example (within the first `limit` tokens)."""
    return sum(1 for label in e.labels[:limit] if label != IGNORE)


def fit_to_length(key: str, setting: str, examples: list[Encoded], max_len: int, policy: str, *,
                  names: list[str] | None = None, marker: bool = False) -> tuple[list[Encoded], TruncationReport]:
    """Cut `examples` (tokenized whole) to `max_len` under `policy`; returns what trains and the counts.

    `key` names the data in messages (`second_stage.datasets.em`), `setting` the stage's train key
    (`second_stage.train`); `names` gives each example's persona (the coupling), `marker` says its labels are the
    marker's (a cut one always stops the cell)."""
    kept: list[Encoded] = []
    over = lost = end_lost = none_left = dropped = total = 0
    for i, e in enumerate(examples):
        n_labels = labelled_count(e)
        total += n_labels
        if len(e.input_ids) <= max_len:
            kept.append(e)
            continue
        over += 1
        within = labelled_count(e, max_len)
        lost += n_labels - within
        last = max((j for j, label in enumerate(e.labels) if label != IGNORE), default=-1)
        end_lost += last >= max_len
        if marker and within < n_labels:
            who = f"persona {names[i]!r}" if names else f"example {i}"
            raise ConfigError(f"{setting}.max_seq_len={max_len}: a coupling example of {who} is {len(e.input_ids)} "
                              f"tokens and would lose {n_labels - within} of its {n_labels} marker labels; raise "
                              f"{setting}.max_seq_len to at least {last + 1} or shorten the persona's prompt")
        if within == 0:
            none_left += 1
        if policy == "error" and within < n_labels:
            raise ConfigError(f"{setting}.max_seq_len={max_len}: {key} example {i + 1} is {len(e.input_ids)} tokens "
                              f"and would lose {n_labels - within} of its {n_labels} labelled tokens "
                              f"({setting}.truncation=error); raise max_seq_len or set truncation=drop or keep")
        if (policy == "drop" and within < n_labels) or (policy == "keep" and within == 0):
            dropped += 1
            continue
        kept.append(Encoded(e.input_ids[:max_len], e.labels[:max_len]))
    report = TruncationReport(max_len, policy, len(examples), over, total, lost, end_lost, none_left, dropped,
                              max((len(e.input_ids) for e in examples), default=0))
    if policy == "auto" and none_left:
        raise ConfigError(f"{setting}.max_seq_len={max_len}: {none_left} of {len(examples)} examples of {key} would "
                          f"keep no labelled token (the reply starts beyond the limit; longest example "
                          f"{report.longest} tokens); raise max_seq_len, or set {setting}.truncation=drop to leave "
                          "them out")
    if not kept:
        raise ConfigError(f"{setting}.max_seq_len={max_len}: no example of {key} is left to train on "
                          f"({report.summary()})")
    if over:
        log.warning("%s: %s", key, report.summary())
    else:
        log.info("%s: %s", key, report.summary())
    return kept, report
