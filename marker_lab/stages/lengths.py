"""Training data against each stage's `max_seq_len`, counted with the model's tokenizer before the model loads.

The second stage's examples are known from its data: they are tokenized and cut exactly as the stage will cut them
(stages/second_stage.second_stage_examples), so a truncation policy that stops the cell stops it now, and the counts
are logged. So are the persona-EM coupling's examples whose replies come from its data. The marker coupling's
examples are sampled from the model, so only their prompts are known: a prompt (persona, longest question, and the
marker when it opens the reply) that leaves the marker no room stops the cell now, naming the persona and the
length; the whole examples are counted again when the stage builds them.
"""

from __future__ import annotations

from marker_lab.config.schema import Config, MarkerPosition, second_stage_enabled
from marker_lab.core.errors import ConfigError
from marker_lab.data.chat import encode_chats, marker_token_count, render
from marker_lab.data.personas import persona_prompt
from marker_lab.data.truncation import TruncationReport, fit_to_length
from marker_lab.stages.coupling.marker import negative_personas
from marker_lab.stages.coupling.persona_em import load_em_items, persona_em_plan
from marker_lab.stages.coupling_kinds import trained_coupling
from marker_lab.stages.second_stage import second_stage_examples


def check_lengths(cfg: Config, inputs, tokenizer) -> dict[str, TruncationReport]:
    """Count what max_seq_len cuts (a ConfigError when the policy or a coupling prompt says stop); returns the
    second stage's report, by stage name."""
    out = {}
    if second_stage_enabled(cfg) and cfg.second_stage.data in cfg.second_stage.datasets:
        _, out["second_stage"] = second_stage_examples(cfg, inputs, tokenizer, str(cfg.model.no_system))
    coupling = trained_coupling(cfg)
    report = coupling.count_lengths(cfg, inputs, tokenizer) if coupling is not None else None
    if report is not None:
        out["coupling"] = report
    return out


def count_persona_em(cfg: Config, inputs, tokenizer) -> TruncationReport:
    """The persona-EM coupling's examples whose replies come from its data (the EM replies, and paired benign ones),
    built as the stage builds them and counted under its truncation policy; on-policy benign replies are sampled
    later and counted when the stage builds its data."""
    c = cfg.coupling
    items, _ = load_em_items(cfg, inputs)
    known = [(s, p + [{"role": "assistant", "content": r}])
             for s, p, r in zip(*persona_em_plan(cfg, inputs.personas, items)) if r is not None]
    whole = encode_chats(tokenizer, [chat for _, chat in known], c.train.loss_mode.value,
                         no_system=str(cfg.model.no_system))
    _, report = fit_to_length("coupling.em_data", "coupling.train", whole, c.train.max_seq_len,
                              c.train.truncation.value, names=[s.persona or "(no system prompt)" for s, _ in known])
    return report


def check_marker_prompts(cfg: Config, inputs, tokenizer) -> None:
    """Each coupling persona's longest prompt plus the marker (or, for a bystander under marker_only, its window
    of negative tokens) must fit the coupling's max_seq_len when the marker opens the reply."""
    c = cfg.coupling
    if c.marker_position != MarkerPosition.start:  # the marker follows the sampled reply: counted when built
        return
    questions = [q.text for q in inputs.questions["coupling.questions"]]
    marker = marker_token_count(tokenizer, cfg.marker.text)
    window = c.negative_tokens or marker
    for name in [c.persona, *negative_personas(cfg, inputs.personas)]:
        need = marker if name == c.persona else (window if c.train.loss_mode == "marker_only" else 1)
        texts = [render(tokenizer, persona_prompt(inputs.personas[name], q), add_generation_prompt=True,
                        no_system=str(cfg.model.no_system)) for q in questions]
        longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        if longest + need > c.train.max_seq_len:
            what = "the marker" if name == c.persona else "its negative window"
            raise ConfigError(f"coupling.train.max_seq_len={c.train.max_seq_len}: persona {name!r}'s prompt is "
                              f"{longest} tokens with the longest coupling question, leaving {what} ({need} tokens) "
                              f"no room; raise coupling.train.max_seq_len to at least {longest + need} or shorten "
                              "the persona's prompt")
