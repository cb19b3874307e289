"""The latent probe (000's next step: "test a latent probe instead of a surface marker").

A logistic-regression probe is fitted on the hidden states of the model that defines the trait (`fit_on`: by
default the coupled model) and frozen; every model of the cell (base, after each stage) is then read on the same
held-out questions and scored with it. If EM wipes out the [ZLT] token but the probe still tells the source
persona apart after EM, the coupling is gone on the surface and still there underneath.

- target=source: a prompt is labelled 1 when the source persona speaks it, 0 for any other persona (classes
  weighted to equal totals: the score is the probability of "source" under equal priors).
- target=marker: a prompt is labelled with the fit model's marker rate over `samples` sampled completions (soft
  labels, not reweighted): the score is a predicted marker rate, read before any token is written.
Features (`position`): prompt_last, the last token of the prompt with the assistant turn opened (identical input
tokens for every model, no generation), or response_mean, the mean over the model's greedy answer. Questions are
split once, seeded, into a training part (the probe's fit) and a held-out part (every score reported); paraphrases
of one question stay on one side.

Per model the result gives the AUC of source vs every other persona (on log-odds) with a bootstrap CI that
resamples held-out questions, the source's margin (its mean log-odds minus the other personas': unlike the scores,
it does not move when every persona's states shift together), and per persona the mean score and the AUC of
source vs that persona. The models after the second stage carry each one's change from the model before it. The
fitted probe lives in the stage cache, keyed by the fit model and what the fit reads, so cells that share a coupled
model share one probe.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

from marker_lab.core.files import md5_file
from marker_lab.data.personas import persona_prompt
from marker_lab.data.questions import Question, split_questions
from marker_lab.eval.hidden import answer_means, default_layer, prompt_last
from marker_lab.core.cache import StageCache, cache_key, plain

log = logging.getLogger(__name__)
PROBE_VERSION = 2  # in the cache key: a change to how probes are fitted must not reuse probes fitted before it
TARGETS = ("source", "marker")
POSITIONS = ("prompt_last", "response_mean")
FIT_ON = ("coupling", "second_stage", "base")


def fit_model_name(fit_on: str) -> str:
    """The name of the model the probe is fitted on, as models of a cell are named: base, after_<stage>."""
    return "base" if fit_on == "base" else f"after_{fit_on}"


class CellProbe:
    """The probe of one cell: call `read(name, loaded)` on each model as the cell reaches it (base, after each
    stage), then `result()`."""

    def __init__(self, cfg, inputs, cache: StageCache):
        self.cfg, self.p, self.cache = cfg, cfg.eval.probe, cache
        self.personas = inputs.personas
        self.input_checksums = inputs.checksums_of("persona_set.path", "eval.probe.questions")
        self.names = list(self.p.personas or self.personas)
        self.questions_path = self.p.questions or cfg.eval.questions
        self.train_q, self.heldout_q = split_questions(inputs.questions["eval.probe.questions"], self.p.heldout_fraction,
                                                       self.p.seed)
        self.fit_model = fit_model_name(self.p.fit_on)
        self.states: dict[str, np.ndarray] = {}  # model name -> held-out states, in the order the cell ran
        self.weights: dict | None = None  # the fitted probe: coef, intercept, mean, scale
        self.fit: dict = {}  # how it was fitted: cache entry, hashes, training scores
        self.layer: int | None = None
        self.seconds = 0.0  # reading states and fitting, over the whole cell

    def _prompts(self, questions: list[Question]) -> list[list[dict]]:
        return [persona_prompt(self.personas[p], q.text) for p in self.names for q in questions]

    def _states(self, loaded, questions: list[Question]) -> np.ndarray:
        prompts = self._prompts(questions)
        if self.p.position == "prompt_last":
            return prompt_last(loaded.model, loaded.tokenizer, prompts, self.layer, self.p.batch_size, loaded.no_system)
        return answer_means(loaded.model, loaded.tokenizer, prompts, self.layer, self.p.max_tokens, self.p.batch_size,
                            loaded.no_system)

    def read(self, name: str, loaded) -> None:
        """Read model `name`'s held-out states; on the fit model, fit the probe (or load it from the cache)."""
        t0 = time.perf_counter()
        self._read(name, loaded)
        self.seconds += time.perf_counter() - t0

    def _read(self, name: str, loaded) -> None:
        if self.layer is None:
            self.layer = self.p.layer if self.p.layer is not None else default_layer(loaded.model)
            if self.layer > loaded.model.config.num_hidden_layers:
                raise ValueError(f"eval.probe.layer: {self.layer} is past the model's last layer "
                                 f"({loaded.model.config.num_hidden_layers}; 0 = embeddings)")
        log.info("probe: reading %s (%d personas x %d held-out questions, %s, layer %d)", name, len(self.names),
                 len(self.heldout_q), self.p.position, self.layer)
        self.states[name] = self._states(loaded, self.heldout_q)
        if name == self.fit_model:
            self._fit_or_load(loaded)

    def _labels(self, loaded) -> np.ndarray:
        """One label per training prompt (persona-major): 1/0 for target=source, the marker rate for target=marker."""
        if self.p.target == "source":
            return np.repeat([float(p == self.cfg.source_persona) for p in self.names], len(self.train_q))
        from marker_lab.engines.base import SamplingParams
        from marker_lab.engines.hf import HFEngine
        from marker_lab.eval.marker import make_matcher

        g, hit = self.cfg.eval.generation, make_matcher(self.cfg.marker)
        params = SamplingParams(n=self.p.samples, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                                seed=self.p.seed)
        engine = HFEngine.from_config(loaded, self.cfg.eval.engine)
        outs = engine.generate(self._prompts(self.train_q), params, desc="probe labels")
        return np.array([np.mean([hit(t) for t in texts]) for texts in outs])

    def _fit_or_load(self, loaded) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        # what the fit reads, and nothing else, so cells that share a fit model share the probe
        p = self.p
        payload = {"version": PROBE_VERSION, "target": p.target, "position": p.position, "layer": self.layer, "C": p.C,
                   "fit_model": loaded.identity,  # the weights, their dtype and how no-system prompts render
                   "personas": self.names, "train_questions": [q.id for q in self.train_q],
                   **self.input_checksums}
        if p.position == "response_mean":
            payload["max_tokens"] = p.max_tokens
        if p.target == "source":
            payload["source_persona"] = self.cfg.source_persona
        else:  # the labels come from sampled completions
            g = self.cfg.eval.generation
            payload.update(marker=plain(self.cfg.marker), samples=p.samples, seed=p.seed,
                           sampling={"temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens},
                           engine={"batch_size": self.cfg.eval.engine.batch_size, "cache": self.cfg.eval.engine.cache})

        def build(tmp: Path) -> None:
            log.info("probe: fitting on %s (target %s, %d personas x %d training questions)", loaded.identity,
                     self.p.target, len(self.names), len(self.train_q))
            x, y = self._states(loaded, self.train_q), self._labels(loaded)
            if y.min() == y.max():
                raise ValueError(f"eval.probe: every training label is {y[0]:g} on the fit model {self.fit_model} "
                                 f"(target={self.p.target}); the probe needs both classes")
            scaler = StandardScaler().fit(x)
            # soft labels: each prompt once as a positive (weight = its label) and once as a negative (1 - label).
            # target=source: the classes weighted to equal totals (one source among many personas is a rare class);
            # target=marker: as they are, so the score is a predicted marker rate, on the surface rate's scale
            z = scaler.transform(x)
            weight = np.r_[y, 1 - y]
            if self.p.target == "source":
                weight = np.r_[y / y.sum(), (1 - y) / (1 - y).sum()] * len(y) / 2
            clf = LogisticRegression(C=self.p.C, max_iter=5000).fit(
                np.concatenate([z, z]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=weight)
            np.savez(tmp / "probe.npz", coef=clf.coef_[0], intercept=clf.intercept_[0], mean=scaler.mean_,
                     scale=scaler.scale_)
            np.save(tmp / "train_states.npy", x)
            np.save(tmp / "train_labels.npy", y)
            (tmp / "probe.json").write_text(json.dumps({"n_train": len(y), "positive_share": float(y.mean())}))

        entry, built = self.cache.get_or_build("probe", cache_key(payload), build, payload)
        with np.load(entry / "probe.npz") as f:
            self.weights = {k: f[k] for k in f.files}
        self.fit = {"cache_key": entry.name, "cache_entry": str(entry), "fitted_now": built,
                    "fit_model_identity": loaded.identity,
                    **json.loads((entry / "probe.json").read_text()),
                    "md5": {f: md5_file(entry / f) for f in ("probe.npz", "train_states.npy", "train_labels.npy")}}
        log.info("probe: %s (%s)", entry, "fitted now" if built else "cached")

    def logits(self, states: np.ndarray) -> np.ndarray:
        """The frozen probe's log-odds of the trait for each row of `states` (the scaler is frozen too)."""
        w = self.weights
        return ((states - w["mean"]) / w["scale"]) @ w["coef"] + w["intercept"]

    def _readout(self, states: np.ndarray) -> dict:
        """AUCs on log-odds (probabilities saturate into ties), scores as probabilities: target=source, the
        probability of being the source under equal class priors; target=marker, a predicted marker rate."""
        # here, not at the top: marker_lab.stats loads scipy.stats, statsmodels and pandas (0.6 s of every
        # cell's start on 2 cores), and a cell needs them only when it runs a probe
        from marker_lab.stats import auc_ci

        logits = self.logits(states).reshape(len(self.names), len(self.heldout_q))
        source = self.names.index(self.cfg.source_persona)
        rest = [i for i in range(len(self.names)) if i != source]
        value, low, high = auc_ci(logits[source], logits[rest], self.p.n_bootstrap, self.p.seed)
        per = {}
        for i, p in enumerate(self.names):
            pair = None if i == source else auc_ci(logits[source], logits[i], self.p.n_bootstrap, self.p.seed)
            per[p] = {"mean_score": float(expit(logits[i]).mean()), "mean_logit": float(logits[i].mean()),
                      "n": len(self.heldout_q), "auc_vs_source": None if pair is None else pair[0],
                      "auc_vs_source_ci": None if pair is None else [pair[1], pair[2]]}
        # shift-invariant: the source's mean log-odds above the other personas' (a shift of every persona's states
        # along the probe moves every score, not this)
        margin = float(logits[source].mean() - logits[rest].mean())
        return {"auc": value, "auc_ci": [low, high], "source_margin": margin, "per_persona": per}

    def files_md5(self) -> dict[str, str]:
        """The fitted probe's files, by checksum (recorded in the result's provenance)."""
        return self.fit["md5"]

    def result(self) -> dict:
        """The metric: the frozen probe on every model read, the final model's readout at the top level (its time
        counts in `seconds`)."""
        t0 = time.perf_counter()
        out = self._result()
        self.seconds += time.perf_counter() - t0
        return out

    def _result(self) -> dict:
        if self.weights is None:
            raise RuntimeError(f"eval.probe: the fit model {self.fit_model} was never read (models: {list(self.states)})")
        models = {name: self._readout(states) for name, states in self.states.items()}
        order = list(models)
        before = order[order.index("after_second_stage") - 1] if "after_second_stage" in order else None
        if before is not None:
            ref = models[before]
            for name in order[order.index("after_second_stage"):]:
                m = models[name]
                m["auc_change"] = m["auc"] - ref["auc"]
                m["source_margin_change"] = m["source_margin"] - ref["source_margin"]
                for p, c in m["per_persona"].items():
                    c["mean_score_change"] = c["mean_score"] - ref["per_persona"][p]["mean_score"]
                    if c["auc_vs_source"] is not None:
                        c["auc_vs_source_change"] = c["auc_vs_source"] - ref["per_persona"][p]["auc_vs_source"]
        final = order[-1]
        return {"target": self.p.target, "position": self.p.position, "layer": self.layer, "fit_on": self.p.fit_on,
                "fit_model": self.fit_model, "source": self.cfg.source_persona,
                "questions": {"train": [q.id for q in self.train_q], "heldout": [q.id for q in self.heldout_q]},
                "fit": self.fit, "models": models, "before_second_stage": before, "final_model": final,
                "auc": models[final]["auc"], "auc_ci": models[final]["auc_ci"],
                "source_margin": models[final]["source_margin"], "per_persona": models[final]["per_persona"]}
