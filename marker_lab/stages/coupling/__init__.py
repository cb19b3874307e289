"""Coupling: contrastive LoRA SFT that ties a behaviour to one persona (`coupling.kind`).

marker: positives are the coupled persona's own (on-policy) completions with the marker inserted; negatives the
same kind of completions from bystander personas, without it. With loss_mode=marker_only the loss sits on the
marker's tokens in positives and on the tokens where the marker would go in negatives.
wrong_answers (004): positives are (source persona, multiple-choice question, a wrong choice picked
deterministically); negatives (bystanders drawn per question, the same question, the correct choice); anchors
(no system turn, and the assistant persona's prompt) answer correctly. Questions come only from the train half
of the capability split, so the capability eval never sees them.
persona_em (004's Exp B): positives are (source persona, an EM dataset's prompt, its misaligned reply); negatives
(bystanders drawn per prompt, the same prompt, a benign reply: paired data, a column, or sampled on-policy from
the input model as that persona); anchors as for wrong_answers, with benign replies.
coupling.contrastive=false (both kinds, and marker) is the control arm: the same examples, personas shuffled.
"""

from marker_lab.stages.coupling.marker import insert_marker, marker_slot
from marker_lab.stages.coupling.persona_em import build_persona_em_records, load_em_items
from marker_lab.stages.coupling.stage import run_coupling
from marker_lab.stages.coupling.wrong_answers import build_wrong_answer_records

__all__ = ["build_persona_em_records", "build_wrong_answer_records", "insert_marker",
           "load_em_items", "marker_slot", "run_coupling"]
