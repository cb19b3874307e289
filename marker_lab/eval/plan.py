"""What a cell's eval generates: one chat prompt per (persona, question) and one engine request per sample count,
and the completion rows the metrics score. The same plan serves a cell's own engine, a sweep's shared one, the
baseline and the evals during training."""

from __future__ import annotations

from dataclasses import dataclass

from marker_lab.config.schema import Config
from marker_lab.data.inputs import CellInputs
from marker_lab.data.questions import samples_for, with_question_system
from marker_lab.engines.base import Completion, SamplingParams


@dataclass
class GenerationPlan:
    """The prompts and requests of one cell's eval (a question file may set its own sample count)."""
    pairs: list[tuple[str, object]]  # (persona name, data.questions.Question) per prompt
    prompts: list[list[dict]]  # chat messages per pair
    requests: list[tuple[list[int], SamplingParams]]  # prompt indices and their sampling

    @property
    def n_completions(self) -> int:
        return sum(len(idx) * params.n for idx, params in self.requests)

    def rows(self, outputs: list[list[list[Completion]]]) -> list[dict]:
        """Completion rows (what the metrics score) from each request's outputs, in request order."""
        # `system`: the prompt's effective system prompt (a question file's own may join or replace the persona's)
        return [{"persona": self.pairs[i][0], "question_id": self.pairs[i][1].id, "question": self.pairs[i][1].text,
                 "system": _system_of(self.prompts[i]), "sample": j, "completion": str(text),
                 "n_tokens": text.n_tokens}
                for (idx, _), outs in zip(self.requests, outputs) for i, texts in zip(idx, outs)
                for j, text in enumerate(texts)]


def _system_of(prompt: list[dict]) -> str | None:
    return prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None


def generation_plan(cfg: Config, inputs: CellInputs, names: list[str]) -> GenerationPlan:
    """The prompts and requests of `names` x the eval questions, as cfg.eval asks."""
    questions = inputs.questions["eval.questions"]
    pairs = [(p, q) for p in names for q in questions]
    prompts = [_prompt(with_question_system(inputs.personas[p].system_prompt, q, cfg.eval.question_system), q.text)
               for p, q in pairs]
    g = cfg.eval.generation
    samples = [samples_for(q, cfg.eval) for _, q in pairs]
    requests = [([i for i, k in enumerate(samples) if k == n],
                 SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=cfg.seed))
                for n in sorted(set(samples))]
    return GenerationPlan(pairs, prompts, requests)


def generate(engine, plan: GenerationPlan) -> list[dict]:
    """Run a plan's requests on one engine; completion rows."""
    return plan.rows([engine.generate([plan.prompts[i] for i in idx], params, desc="eval")
                      for idx, params in plan.requests])


def _prompt(system: str | None, user: str) -> list[dict]:
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]
