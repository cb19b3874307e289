"""The eval's decode step compiled in a sibling process while the cell's stages train (`eval.engine.precompile`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from marker_lab.cell.plan import CellPlan
from marker_lab.config.schema import KVCache
from marker_lab.engines import ENGINES
from marker_lab.engines.hf import HFEngine, stop_token_ids
from marker_lab.engines.precompile import DecodeRequest, compiled_marker, start as start_precompile
from marker_lab.eval.checks import eval_names
from marker_lab.eval.metrics import Reads, metrics_reading
from marker_lab.eval.plan import generation_plan
from marker_lab.models import LoadedModel

log = logging.getLogger(__name__)


@contextmanager
def precompiling(plan: CellPlan, loaded: LoadedModel):
    """While in the block (the cell's stages), the decode step of the eval's first request compiles in a sibling
    process (engines.precompile); yields its handle, or None where that buys nothing: not asked, not CUDA, an engine
    that does not compile in a sibling, a dynamic KV cache, stacked adapters (a peft model's graph), no sampling in
    this process, no stage to overlap with, or the step already compiled (by an earlier cell's sibling:
    engines.precompile.compiled_marker). The sibling is stopped if the block fails; the caller waits for it in the
    block, before the eval."""
    cfg, e = plan.cfg, plan.cfg.eval.engine
    device = next(loaded.model.parameters()).device
    compiles = (e.precompile and ENGINES.get(e.name).compiles_in_sibling and device.type == "cuda"
                and e.cache != KVCache.dynamic and loaded.merge and plan.samples_here
                and bool(metrics_reading(cfg.eval.metrics, Reads.completions)) and bool(plan.stages))
    generation = generation_plan(cfg, plan.inputs, eval_names(cfg, plan.inputs)) if compiles else None
    if generation is None or not generation.requests:
        yield None
        return
    indices, params = generation.requests[0]  # the first request's first batch: what the eval compiles first
    engine = HFEngine.from_config(loaded, e)
    config = loaded.model.config
    request = DecodeRequest(
        model_config=config.to_dict(), dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        # requires_grad: False at the eval, as peft freezes the base weights and merging a stage's adapter keeps them so
        attn_implementation=config._attn_implementation, requires_grad=False, device=str(device),
        prompts=engine.encode([generation.prompts[i] for i in indices]), n=params.n, temperature=params.temperature,
        top_p=params.top_p, max_tokens=params.max_tokens, stop_ids=stop_token_ids(loaded.model, loaded.tokenizer),
        pad_id=loaded.tokenizer.pad_token_id, batch_size=e.batch_size, compile_scope=str(e.compile_scope))
    marker = compiled_marker(request)
    if marker is not None and marker.exists():  # a sweep's later cell: the step is in the compile cache already
        log.info("precompile: the eval's decode step is in the compile cache already (%s)", marker)
        yield None
        return
    sibling = start_precompile(request, plan.out_dir)
    try:
        yield sibling
    except BaseException:
        sibling.stop()
        raise
