"""The static engine's decode loop: one prefill (each prompt once for its samples, all but its last token), then
one decode step per token (the last prompt token's first) on a preallocated KV cache, the step compiled once
(CUDA) and replayed as a CUDA graph: the whole model as one graph (`compile_scope="model"`), each decoder layer
compiled on its own (`"layers"`: Inductor compiles one layer's graph and reuses it for the others, a fraction of
the whole model's compile), or one graph that every layer runs on its own cache slot (`"shared_layers"`, the
cell's default: the shortest cold compile, the 7B eval's first batch in 33 s against 55 s per layer on one H200,
the same steady rate).

Why not `generate`: on the 7B eval (1,030 sequences, a 602-slot cache, one H200) its per-step host work (input
preparation, a growing mask, a stop check that waits for the GPU every step) made a step ~51 ms where the compiled
forward and sampler alone take ~44 ms (docs/benchmarks.md). This loop draws what generate draws for plain
sampling: the same rows (each prompt repeated n times), the same logits warpers in generate's order and the same
`multinomial` call, so with the same seed it returns generate's tokens (tests/test_engines.py, on CPU). It reads
the stop flags every `check_every` steps instead of every step; a batch that ends early runs at most that many
extra steps, whose tokens are discarded.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from marker_lab.engines import attention


def logits_warpers(temperature: float, top_p: float) -> LogitsProcessorList:
    """What `generate` applies before sampling at this temperature and top_p (no top-k, no penalties)."""
    warpers = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if temperature > 0 and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def forward_last(model, input_ids, attention_mask, position_ids, cache_position, cache, cache_kwarg: str):
    """The model's next-token logits (last position only) with `cache` updated in place."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache_position=cache_position, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
    return out.logits[:, -1]


@functools.cache
def compiled_forward_last():
    """`forward_last` compiled once per process (on first use: importing dynamo costs seconds); each model it meets
    compiles its own graph (dynamo guards on the model), as generate's compiled call does."""
    return torch.compile(forward_last, mode="reduce-overhead", fullgraph=False, dynamic=False)


COMPILE_SCOPES = ("model", "layers", "shared_layers")
PER_LAYER = ("layers", "shared_layers")  # the scopes that compile the decoder layers, not the model
BOOLEAN_MASK = ("sdpa", attention.NAME)  # attention implementations whose mask is a 4-d boolean one


@contextmanager
def decode_step(model, compile_scope: str | None):
    """The decode step to call while in the block: `forward_last` eager (None), compiled as one graph of the whole
    model ("model"), or with each decoder layer compiled ("layers", "shared_layers"; restored on exit). Each
    compiled form replays as CUDA graphs on CUDA.

    "layers": dynamo traces each layer once (a layer's index is an int attribute, which dynamo takes for a
    constant: 28 graphs on the 7B, their recompiles about 0.44 s apart in a real cell's log), and Inductor compiles
    the first and finds the others in its cache (the same code). "shared_layers": one graph serves every decoder
    layer, each running it on a one-layer view of the KV cache that holds its own slot (_through_compiled); where
    layers differ by kind (`config.layer_types`: sliding-window and full attention mixed) it falls back to
    "layers". Layers already compiled for training keep their training graphs; the step then compiles the whole
    model over them.

    Each call of every compiled step starts a new iteration of its CUDA graphs (_new_iteration_each_call): a
    per-layer step must mark them, and once one step has marked, a process's CUDA-graph iterations start at marks
    only (cudagraph_trees' get_curr_generation reads the mark counter instead of dynamo's frame count). Unmarked,
    the whole-model step would then run every decode step in one iteration while the previous step's logits are
    alive, and record a new CUDA graph per step; so it marks too, and a process may decode with both scopes in
    either order (a cell's final eval per layer, then a sweep's next cell in the same process, whose evals during
    training take the whole-model step over its compiled training layers)."""
    if compile_scope is None:
        yield forward_last
        return
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope: must be one of {COMPILE_SCOPES} or None, got {compile_scope!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(base.get_decoder().layers)
    if compile_scope == "model" or any("forward" in vars(layer) for layer in layers):
        yield _new_iteration_each_call(compiled_forward_last())
        return
    shared = compile_scope == "shared_layers" and _uniform_layers(base.config)
    indexed = ([m for layer in layers for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]
               if shared else [])  # the modules whose layer_idx the shared graph must not see
    saved = [m.layer_idx for m in indexed]
    try:
        for i, layer in enumerate(layers):
            layer.forward = _through_compiled(layer, i if shared else None)
        for m in indexed:  # shared: each layer reads its own cache slot as slot 0 of a one-layer view
            m.layer_idx = 0
        # one graph per layer where they cannot share one, all on one code object: past dynamo's default limit of 8
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 2 * len(layers))):
            yield _new_iteration_each_call(forward_last)
    finally:
        for m, idx in zip(indexed, saved):
            m.layer_idx = idx
        for layer in layers:
            vars(layer).pop("forward", None)  # the class's eager forward again


def _uniform_layers(config) -> bool:
    """Whether every decoder layer runs the same code on its own KV cache slot, so one graph can serve them all:
    no per-layer attention types (sliding-window and full layers mixed), whose layers read their kind by index."""
    return len(set(getattr(config, "layer_types", None) or [None])) == 1


@functools.cache
def compiled_layer_forward():
    """`_layer_forward` compiled once per process, for every decoder layer of every model the per-layer scopes meet.
    Its graphs live on this module's code, not on the layer class's: there they would count against dynamo's
    recompile limit (8 per code object; the 7B has 28 layers) when a training later in the same process (a sweep's
    next cell) compiles the layers, which would then run eager."""
    return torch.compile(_layer_forward, mode="reduce-overhead", fullgraph=False, dynamic=False)


def _layer_forward(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)  # the class's forward: the layer's own is _through_compiled


def _through_compiled(layer, own_slot: int | None):
    """`layer`'s forward through the compiled `_layer_forward`. `own_slot` None ("layers"): the layer as it is, its
    index an int attribute that dynamo takes for a constant, so each layer traces a graph of its own. `own_slot` i
    ("shared_layers"): the layer gets a one-layer view of the KV cache holding slot i (the step sets every
    layer_idx to 0, so no layer's index reaches the graph); the cache's tensors are inputs of static address
    without a guard on their address, so one graph serves every layer's slot. CUDA graphs record each layer's call
    on its own either way (its place in the step)."""

    def forward(*args, **kwargs):
        if own_slot is not None:
            key = "cache" if "cache" in kwargs else "past_key_values"  # transformers renamed it (5.2x)
            if kwargs.get(key) is None:  # every layer_idx is 0 here: without the view all would write slot 0
                raise RuntimeError("compile_scope=shared_layers: the decoder layer got no KV cache (keyword "
                                   "`cache` or `past_key_values`); this transformers release passes it otherwise: "
                                   "use `layers`")
            own = kwargs[key].layers[own_slot]
            for t in vars(own).values():  # static addresses without a guard on them (older torch guarded them
                if isinstance(t, torch.Tensor) and hasattr(t, "_dynamo_static_input_type"):  # by default)
                    torch._dynamo.mark_static_address(t, guard=False)
            view = copy.copy(kwargs[key])  # shallow: the view's one layer is the cache's own
            view.layers = [own]
            kwargs[key] = view
        return compiled_layer_forward()(layer, *args, **kwargs)

    return forward


def _new_iteration_each_call(step):
    """`step` with each call marked as a new iteration of its CUDA graphs, whose memory may then be reused (a step's
    logits are sampled before the next step). Unmarked, cudagraph trees take every entry into a compiled function
    for a new iteration: with per-layer graphs each layer's entry would free the previous layer's output, its own
    input. Once marked, a process's iterations start at marks only (torch.compiler.cudagraph_mark_step_begin),
    also for other compiled functions with CUDA graphs, hence every scope marks."""

    def each_call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args)

    return each_call


@torch.no_grad()
def sample_static(model, input_ids: torch.Tensor, mask: torch.Tensor, n: int, temperature: float, top_p: float,
                  max_new: int, stop_ids: list[int], pad_id: int, cache_kwarg: str,
                  cache: StaticCache | None = None, check_every: int = 16,
                  shared_prefill: bool = True, compile_scope: str | None = None,
                  max_steps: int | None = None) -> tuple[torch.Tensor, StaticCache]:
    """New tokens (rows x n, up to max_new) for left-padded prompts `input_ids` / `mask` (rows x width), each
    prompt's n samples adjacent; after a row's stop token the row holds `pad_id`. `cache`: a StaticCache of this
    shape from an earlier batch, reused (reset) so the compiled step keeps its buffers; returned for the next batch.
    `shared_prefill`: each prompt goes through the model once for its n samples (see _prefill_shared).
    `compile_scope`: how the decode step is compiled (see decode_step); None: eager. `max_steps`: stop after this
    many new tokens (a warm-up: the cache keeps its full `max_new` length, so the step compiles at its real shapes).
    """
    device = input_ids.device
    ids, mask = input_ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    rows, width = ids.shape
    cache = _fresh_cache(model, cache, width + max_new)
    full_mask, step_mask = _decode_masks(model, mask, max_new, compile_scope, device)
    lengths = mask.sum(-1, keepdim=True)
    prompt_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's positions for left padding
    warpers = logits_warpers(temperature, top_p)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
    slots = torch.arange(width - 1, width + max_new, device=device)  # the cache slot each step writes
    done = 0
    shared = shared_prefill and n > 1 and width > 1
    if shared:  # the prefill is eager (its shapes are not the step's), each prompt once for its n samples
        _prefill_shared(model, input_ids[:, :-1], full_mask[::n, :width - 1], prompt_positions[::n, :-1], n, cache,
                        cache_kwarg)
    else:
        logits = forward_last(model, ids, full_mask[:, :width], prompt_positions, torch.arange(width, device=device),
                              cache, cache_kwarg)
    with decode_step(model, compile_scope) as step:
        if shared:
            # the last prompt token of every row: one decode step (the compiled one: same shapes) from the shared
            # cache (contiguous: a column slice has the prompt's row stride, and a new stride would compile a
            # second graph)
            logits = step(model, ids[:, -1:].contiguous(), step_mask(slots[0]), lengths - 1,
                          slots[:1], cache, cache_kwarg)
        for i in range(max_new):
            token = torch.where(unfinished, _next_token(warpers, ids, logits, temperature), pad_id)
            out[:, i] = token
            unfinished &= ~torch.isin(token, stops)
            done = i + 1
            if done in (max_new, max_steps) or (done % check_every == 0 and not bool(unfinished.any())):
                break
            logits = step(model, token[:, None], step_mask(slots[i + 1]), lengths + i,
                          slots[i + 1:i + 2], cache, cache_kwarg)
    return out[:, :done], cache


def _fresh_cache(model, cache: StaticCache | None, length: int) -> StaticCache:
    """A StaticCache of `length` slots, as generate allocates it, or `cache` (an earlier batch's, of this shape)
    reset, so the compiled step keeps its buffers."""
    if cache is None:
        return StaticCache(config=model.config, max_cache_len=length)  # what generate allocates
    cache.reset()
    return cache


def _decode_masks(model, mask: torch.Tensor, max_new: int, compile_scope: str | None, device: torch.device):
    """The 2-d attention mask over every cache slot (rows x (width + max_new): a fixed shape, the cache masks
    future slots), and the decode step's mask at a cache slot (`step_mask(slot)`).

    Per-layer graphs with sdpa: the step's 4-d boolean mask, the one transformers would build from the 2-d mask,
    built here; there it is built outside the compiled layers after a check that waits for the GPU (has the batch
    padding?), and a 4-d mask is used as given. A whole-model graph builds it inside; other attention
    implementations take the 2-d mask."""
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new)], 1)
    valid = (full_mask.bool()[:, None, None, :]
             if compile_scope in PER_LAYER and model.config._attn_implementation in BOOLEAN_MASK else None)
    cache_slots = torch.arange(full_mask.shape[1], device=device)

    def step_mask(slot: torch.Tensor) -> torch.Tensor:
        return full_mask if valid is None else valid & (cache_slots <= slot)

    return full_mask, step_mask


def _next_token(warpers: LogitsProcessorList, ids: torch.Tensor, logits: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Each row's next token, drawn as generate draws it: the logits warpers in generate's order, then one
    `multinomial` draw (temperature > 0) or the argmax."""
    scores = warpers(ids, logits.float())
    if temperature > 0:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(-1)


def _prefill_shared(model, prompt_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, n: int,
                    cache: StaticCache, cache_kwarg: str) -> None:
    """Fill `cache` (rows = prompts x n) with the key/value states of `prompt_ids` (one row per prompt, all but
    the last prompt token), each prompt run once and its states repeated for its n samples: the 7B eval's 1,030
    rows are 103 prompts, so the prefill does a tenth of the work. The cache is written through Cache.update, as
    a prefill of every row would write it: slots 0..width-2 of a fresh or reset cache (transformers 5 writes at
    each layer's fill counter, which reset() zeroes, and advances it; older releases read `cache_position`)."""
    width = prompt_ids.shape[1]
    shared = DynamicCache()
    forward_last(model, prompt_ids, mask, positions, torch.arange(width, device=prompt_ids.device), shared,
                 cache_kwarg)
    slots = {"cache_position": torch.arange(width, device=prompt_ids.device)}
    for i, layer in enumerate(shared.layers):
        cache.update(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0), i, slots)
