"""Engine conformance, run for every engine that is importable: batched left-padded generation matches
unpadded generation, n samples per prompt, max_tokens and stop at end of turn are honoured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from marker_lab.config.schema import ModelConfig
from marker_lab.engines.base import SamplingParams
from marker_lab.engines.hf import HFEngine
from marker_lab.models import toy_model_dir
from marker_lab.core.cache import StageCache
from marker_lab.toy import world

from conftest import needs_vllm, vllm_marks

PROMPTS = [[{"role": "system", "content": p.system_prompt}, {"role": "user", "content": world.question(t, t % 4)}]
           for p, t in zip(world.PERSONAS, range(0, 33, 3))]
PROMPTS.append([{"role": "user", "content": "hi"}])  # much shorter: forces left padding in a batch


@pytest.fixture(scope="module")
def toy(cache_dir):
    path, _ = toy_model_dir(ModelConfig(), StageCache(cache_dir))
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok, path


def make_engine(name, toy):
    model, tok, path = toy
    if name.startswith("hf"):
        # hf-static: the GPU fast path's cache and fixed shapes (compiled only on CUDA), checked here on CPU
        return HFEngine(model, tok, batch_size=64, cache="static" if name == "hf-static" else "dynamic")
    from marker_lab.engines.vllm import VLLMEngine

    return VLLMEngine(str(path), tok, dtype="float32")


ENGINES = ["hf", "hf-static", pytest.param("vllm", marks=vllm_marks())]


@pytest.fixture(scope="module", params=ENGINES)
def eng(request, toy):
    """Each engine on the toy model (one per module: vLLM's takes half a minute to start), closed afterwards
    (vLLM's worker processes stop with it)."""
    engine = make_engine(request.param, toy)
    yield engine
    engine.close()


def test_left_padded_batches_match_unpadded_generation(eng):
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=40)
    batched = eng.generate(PROMPTS, greedy)
    alone = [eng.generate([p], greedy)[0] for p in PROMPTS]
    assert batched == alone
    # the toy model answers in each persona's voice
    for persona, (completion,) in zip(world.PERSONAS, batched):
        assert any(completion.startswith(o) for o in persona.openers), (persona.name, completion)


def test_sampling_semantics(eng, toy):
    out = eng.generate(PROMPTS[:3], SamplingParams(n=7, temperature=1.0, top_p=1.0, max_tokens=40, seed=3))
    assert [len(o) for o in out] == [7, 7, 7]
    assert len({c for o in out for c in o}) > 3  # sampled, not greedy
    assert not any("<|im_end|>" in c or "<|im_start|>" in c for o in out for c in o)
    short = eng.generate(PROMPTS[:2], SamplingParams(n=2, temperature=1.0, max_tokens=3, seed=3))
    _, tok, _ = toy
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 3 for o in short for c in o)
    again = eng.generate(PROMPTS[:3], SamplingParams(n=7, temperature=1.0, top_p=1.0, max_tokens=40, seed=3))
    assert again == out  # a seed makes a request reproducible


def test_one_prefill_per_prompt_gives_stock_generate_s_completions(toy):
    """The dynamic engine prefills each prompt once for its samples: the completions are stock generate's (each
    prompt run through the model for every sample), left padding included."""
    from marker_lab.engines.hf import HFEngine

    model, tok, _ = toy
    shared, stock = (HFEngine(model, tok, batch_size=64, cache="dynamic", shared_prefill=on) for on in (True, False))
    sampled = SamplingParams(n=6, temperature=1.0, top_p=1.0, max_tokens=40, seed=5)
    a, b = shared.generate(PROMPTS, sampled), stock.generate(PROMPTS, sampled)
    same = sum(x == y for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert same >= 0.95 * 6 * len(PROMPTS), same  # float rounding of a smaller prefill batch may flip a rare draw
    assert len({c for o in a for c in o}) > len(PROMPTS)  # sampled: the samples of a prompt differ


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_static_decode_loop_draws_generate_s_tokens(toy, temperature, top_p):
    """The static engine's own decode loop (engines.static_decode) returns the tokens transformers' generate
    returns on the same static cache and seed: left padding, n samples per prompt, warpers, stop at end of turn,
    and several batches of one request (the loop draws the same random numbers in the same order)."""
    model, tok, _ = toy
    params = SamplingParams(n=1 if temperature == 0 else 4, temperature=temperature, top_p=top_p, max_tokens=40,
                            seed=11)
    ours, ref = (HFEngine(model, tok, batch_size=4 * params.n, cache="static", static_generate=g) for g in (False, True))
    a, b = ours.generate(PROMPTS, params), ref.generate(PROMPTS, params)
    assert len(ours.batch_seconds) > 1  # several batches
    assert a == b
    stopped = [c for cs in a for c in cs if c.n_tokens < 40]
    assert stopped and len({c for cs in a for c in cs}) > len(PROMPTS) * (temperature > 0)


def test_one_prefill_per_prompt_draws_the_full_prefill_s_tokens(toy):
    """The static loop's shared prefill (each prompt once, its states repeated for its samples, the last prompt
    token as the first step) against a prefill of every row: the same tokens, with left padding down to a
    one-token prompt, and the cache reused across requests as the engine reuses it."""
    from marker_lab.engines.hf import _cache_kwarg
    from marker_lab.engines.static_decode import sample_static

    model, tok, _ = toy
    lengths, width, n = [7, 1, 2], 7, 3
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for r, k in enumerate(lengths):
        ids[r, width - k:] = torch.arange(5, 5 + k)
        mask[r, width - k:] = 1
    out, caches = {}, {}
    for shared in (True, False, True):  # the third reuses the first's cache
        torch.manual_seed(4)
        out[shared], caches[shared] = sample_static(
            model, ids, mask, n, 1.0, 1.0, 12, [], tok.pad_token_id, _cache_kwarg(model), caches.get(shared),
            check_every=1, shared_prefill=shared)
        assert out[shared].shape == (3 * n, 12)
    torch.manual_seed(4)
    first = sample_static(model, ids, mask, n, 1.0, 1.0, 12, [], tok.pad_token_id, _cache_kwarg(model),
                          check_every=1, shared_prefill=True)[0]
    assert torch.equal(out[True], out[False]) and torch.equal(first, out[True])
    assert len({tuple(r) for r in out[True].tolist()}) > 3  # sampled: a prompt's samples differ


@pytest.mark.parametrize("scope", ["layers", "shared_layers"])
def test_decode_step_compiled_per_layer_draws_the_eager_step_s_tokens(toy, scope):
    """compile_scope="layers" or "shared_layers" (the decoder layers compiled; Inductor on CPU here, CUDA graphs on
    a GPU): the eager loop's tokens, one dynamo graph per layer ("layers") or one for all ("shared_layers") for
    every batch of a request, eager layers and their own indices again after.
    The prefill runs outside the compiled layers (else each layer would compile a second graph for its shapes)."""
    from marker_lab.engines.hf import _cache_kwarg
    from marker_lab.engines.static_decode import BOOLEAN_MASK, decode_step, sample_static
    from torch._dynamo.utils import counters

    model, tok, _ = toy
    assert model.config._attn_implementation in BOOLEAN_MASK  # so the layers' steps take the loop's 4-d mask
    layers = model.model.layers
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != tok.pad_token_id).long()
    torch._dynamo.reset()
    counters.clear()
    out, cache = {}, None
    for each in (None, scope, scope):  # the second compiled request reuses the graphs and the cache
        torch.manual_seed(3)
        # a limit below the layer count, as dynamo's default (8) is below a 7B's 28 layers: the step raises it
        with torch._dynamo.config.patch(recompile_limit=1):
            out[each], cache = sample_static(model, ids, mask, 2, 1.0, 1.0, 10, [], tok.pad_token_id,
                                             _cache_kwarg(model), cache, check_every=1, compile_scope=each)
        assert not any("forward" in vars(layer) for layer in layers)  # restored
        assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
    assert torch.equal(out[None], out[scope])
    assert len(layers) > 1 and counters["stats"]["unique_graphs"] == (1 if scope == "shared_layers" else len(layers))
    with pytest.raises(ValueError, match="compile_scope"):
        with decode_step(model, "model_and_layers"):
            pass


def test_shared_layers_keeps_a_graph_per_layer_where_layers_differ_in_kind(toy):
    """compile_scope="shared_layers" on a model whose layers differ in kind (`config.layer_types`: sliding-window
    and full attention mixed; some architectures read a layer's kind by its index) falls back to "layers": each
    layer keeps its own index and traces a graph of its own, with the eager loop's tokens."""
    import copy

    from marker_lab.engines.hf import _cache_kwarg
    from marker_lab.engines.static_decode import decode_step, sample_static

    model, tok, _ = toy
    config = copy.deepcopy(model.config)
    config.layer_types = ["full_attention", "sliding_attention"] * (config.num_hidden_layers // 2)
    config.use_sliding_window, config.sliding_window = True, 4096  # longer than any row here
    mixed = type(model)(config).eval()
    mixed.load_state_dict(model.state_dict())
    layers = mixed.model.layers
    with decode_step(mixed, "shared_layers"):  # compiled layers that keep their own indices and the whole cache
        assert all("forward" in vars(layer) for layer in layers)
        assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != tok.pad_token_id).long()
    torch._dynamo.reset()
    out = {}
    for scope in (None, "shared_layers"):
        torch.manual_seed(3)
        out[scope], _ = sample_static(mixed, ids, mask, 2, 1.0, 1.0, 3, [], tok.pad_token_id,
                                      _cache_kwarg(mixed), check_every=1, compile_scope=scope)
    assert torch.equal(out[None], out["shared_layers"])


@pytest.mark.parametrize("scope", ["layers", "shared_layers"])
def test_training_compiles_its_layers_after_a_per_layer_decode(toy, scope):
    """A per-layer decode's graphs live on the decoder layer's code; left there they would count against dynamo's
    recompile limit (8 per code object; the 7B has 28 layers), and a training compiled later in the same process
    (a sweep's next cell) would run eager. The step drops them on exit: the training's layer compiles."""
    import copy

    from marker_lab.engines.hf import _cache_kwarg
    from marker_lab.engines.static_decode import sample_static
    from torch._dynamo.utils import counters

    model, tok, _ = toy
    model = copy.deepcopy(model)
    layers = model.model.layers
    ids = torch.tensor([[tok.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])
    torch._dynamo.reset()
    counters.clear()
    sample_static(model, ids, (ids != tok.pad_token_id).long(), 2, 1.0, 1.0, 3, [], tok.pad_token_id,
                  _cache_kwarg(model), check_every=1, compile_scope=scope)
    decoded = counters["stats"]["unique_graphs"]
    hidden = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    positions = torch.arange(5)[None].expand(2, 5)
    embeddings = model.model.rotary_emb(hidden, positions)
    with torch._dynamo.config.patch(recompile_limit=len(layers)):  # the per-layer graphs alone would fill it
        out = torch.compile(layers[0].forward)(hidden, attention_mask=None, position_ids=positions,
                                               position_embeddings=embeddings)
    out.sum().backward()
    assert counters["stats"]["unique_graphs"] == decoded + 1 and hidden.grad is not None


def test_engine_config_picks_the_compile_scope(toy):
    """`eval.engine.compile_scope` reaches the engine a cell builds; a value outside the three fails at composition."""
    from conftest import composition_error, compose_cfg, to_dataclass

    from marker_lab.models import LoadedModel

    model, tok, _ = toy
    cfg = to_dataclass(compose_cfg(["eval.engine.compile_scope=model"]))
    engine = HFEngine.from_config(LoadedModel(model, tok, "toy"), cfg.eval.engine)
    assert engine.compile_scope == "model"
    assert HFEngine.from_config(LoadedModel(model, tok, "toy"), to_dataclass(compose_cfg([])).eval.engine) \
        .compile_scope == "shared_layers"  # the default since the eleventh session of issue 22 (docs/benchmarks.md)
    assert to_dataclass(compose_cfg(["eval.engine.compile_scope=shared_layers"])).eval.engine.compile_scope \
        == "shared_layers"
    assert "eval.engine.compile_scope" in composition_error(["eval.engine.compile_scope=everything"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step is compiled on CUDA only (no GPU here)")
@pytest.mark.parametrize("scope", ["model", "layers", "shared_layers"])
def test_static_engine_compiles_its_decode_step_once_on_gpu(toy, scope):
    """On CUDA the static engine's step is compiled and replayed as CUDA graphs: the shared prefill's first step,
    every decode step and every batch of a request reuse one graph ("model"), one graph per decoder layer
    ("layers") or one for all layers ("shared_layers"). A recompile, e.g. for a new stride,
    costs ~20 s on the 7B eval."""
    import copy

    from torch._dynamo.utils import counters

    model, tok, _ = toy
    engine = HFEngine(copy.deepcopy(model).cuda(), tok, batch_size=16, cache="static", compile_scope=scope)
    torch._dynamo.reset()  # another model's graph from an earlier test would count as this one's recompile
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=scope != "layers"):
            out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=1))
    finally:  # "layers" marks CUDA-graph iterations for the whole process: unmark for the tests after this one
        from torch._inductor.cudagraph_trees import MarkStepBox

        MarkStepBox.mark_step_counter = 0
    assert len(engine.batch_seconds) > 1 and all(len(cs) == 4 for cs in out)
    if scope == "layers":  # the others: a recompile raised above
        assert counters["stats"]["unique_graphs"] == len(engine.model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step is compiled on CUDA only (no GPU here)")
def test_one_process_decodes_with_every_scope_in_any_order_on_gpu(toy):
    """The decode scopes follow each other in one process (a sweep's cells in one process: a cell's final eval per
    layer, then the next cell's evals during training over its compiled training layers, which take the
    whole-model step), every ordered pair of them: every request completes and greedy tokens agree across the
    scopes and repeats. (Why the whole-model step marks each call: see engines.static_decode.decode_step. A run of
    "layers" and "model" alone passed on an H200 with and without that mark; what the mark avoids is a CUDA graph
    recorded per step, not a wrong token. All three passed on an H200, 2026-12-03.)"""
    import copy

    from torch._inductor.cudagraph_trees import MarkStepBox

    model, tok, _ = toy
    cuda_model = copy.deepcopy(model).cuda()
    torch._dynamo.reset()
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=16, seed=1)
    outs = []
    try:
        # every ordered pair of the three: L>M, M>L, L>S, S>M, M>S, S>L
        for scope in ("layers", "model", "layers", "shared_layers", "model", "shared_layers", "layers"):
            engine = HFEngine(cuda_model, tok, batch_size=16, cache="static", compile_scope=scope)
            outs.append(engine.generate(PROMPTS, greedy))
    finally:
        MarkStepBox.mark_step_counter = 0  # unmark for the tests after this one
    assert all(len(cs) == 1 for cs in outs[0]) and any(c for cs in outs[0] for c in cs)
    assert all(out == outs[0] for out in outs[1:])


@pytest.mark.slow  # two sibling processes, each importing torch and transformers; one compiles (about 35 s)
def test_precompile_sibling_leaves_the_decode_step_in_the_compile_cache(toy, tmp_path, monkeypatch):
    """engines.precompile: a sibling process builds the model's architecture with random weights and compiles the
    static engine's decode step at the request's shapes into the compile cache; an engine here on the real
    weights then takes every compiled graph from that cache (Inductor on CPU here; on CUDA the same, then CUDA
    graphs), and marks the request done there for later cells. A sibling that fails reports it and leaves the eval
    to compile."""
    from torch._dynamo.utils import counters

    from marker_lab.engines.hf import stop_token_ids
    from marker_lab.engines.precompile import DecodeRequest, compiled_marker, start

    model, tok, _ = toy
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))  # empty: a hit is the sibling's
    engine = HFEngine(model, tok, batch_size=8, cache="static", compile_devices=("cpu",), compile_scope="model")
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=10, seed=3)
    request = DecodeRequest(
        model.config.to_dict(), "float32", model.config._attn_implementation,
        next(model.parameters()).requires_grad, "cpu", engine.encode(PROMPTS), params.n, params.temperature,
        params.top_p, params.max_tokens, stop_token_ids(model, tok), tok.pad_token_id, 8, "model")
    assert not compiled_marker(request).exists()
    assert start(request, tmp_path / "sibling").wait(timeout=300), (tmp_path / "sibling/precompile.log").read_text()
    # a later cell with the same request finds the marker and starts no sibling; another request's is not there
    assert compiled_marker(request).exists()
    assert not compiled_marker(DecodeRequest(**{**vars(request), "max_tokens": 11})).exists()
    torch._dynamo.reset()  # this process's own graphs of earlier tests: not what is asked
    counters.clear()
    out = engine.generate_ids(request.prompts, params, request.stop_ids, request.pad_id)
    assert len(out) == len(PROMPTS) and len(engine.batch_seconds) == 3  # 12 prompts x 2 in batches of 8 rows
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0

    broken = DecodeRequest(**{**vars(request), "model_config": {"model_type": "no_such_architecture"}})
    sibling = start(broken, tmp_path / "broken")
    assert not sibling.wait(timeout=120)
    assert "no_such_architecture" in sibling.log_path.read_text()


@pytest.mark.slow  # a sibling process importing torch and transformers
def test_precompile_sibling_ends_when_its_cell_is_killed(toy, tmp_path, monkeypatch):
    """A cell killed with SIGKILL cannot stop its sibling: the sibling notices its parent is gone and exits, so it
    does not hold GPU memory from the next cell; it leaves no marker saying the step compiled."""
    import signal
    import subprocess
    import sys
    import time

    from marker_lab.engines.hf import stop_token_ids
    from marker_lab.engines.precompile import DecodeRequest, compiled_marker

    model, tok, _ = toy
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))
    request = DecodeRequest(
        model.config.to_dict(), "float32", model.config._attn_implementation, True, "cpu",
        HFEngine(model, tok).encode(PROMPTS), 2, 1.0, 0.9, 10, stop_token_ids(model, tok), tok.pad_token_id, 8, "model")
    spec = tmp_path / "request.json"
    spec.write_text(json.dumps(vars(request)))
    cell = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time; p = subprocess.Popen("
                             "[sys.executable, '-m', 'marker_lab.engines.precompile', sys.argv[1], str(os.getpid())]); "
                             "print(p.pid, flush=True); time.sleep(600)", str(spec)], stdout=subprocess.PIPE, text=True)
    sibling = int(cell.stdout.readline())
    cell.send_signal(signal.SIGKILL)
    cell.wait()

    def running(pid: int) -> bool:  # a zombie nobody reaps has ended too
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 60
    while running(sibling) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not running(sibling)
    assert not compiled_marker(request).exists()


@pytest.mark.parametrize("padded", [False, True])
def test_grouped_decode_attention_equals_stock_sdpa(padded):
    """engines.attention (no key/value copies) computes what transformers' sdpa computes, mask included."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from marker_lab.engines.attention import sdpa_gqa_forward

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 7, True

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 28, 1, 16), torch.randn(3, 4, 11, 16), torch.randn(3, 4, 11, 16)
    mask = None
    if padded:
        mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
        mask[0, ..., :4] = False
    ours, _ = sdpa_gqa_forward(Attn(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (3, 1, 28, 16)
    assert torch.allclose(ours, ref, atol=1e-5)


@needs_vllm
def test_vllm_serves_adapters_like_merged_weights(toy, tmp_path):
    """One vLLM engine, several peft adapters (multi-LoRA requests) == the hf engine on each merged model."""
    import torch

    from marker_lab.config.schema import LoraConfig
    from marker_lab.engines.vllm import VLLMEngine
    from marker_lab.train.lora import apply_lora

    model, tok, path = toy
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=20)
    adapters, expected = [], {}
    for seed in (1, 2):
        fresh = AutoModelForCausalLM.from_pretrained(path)
        peft_model = apply_lora(fresh, LoraConfig(r=4, alpha=8, dropout=0.0), seed=seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(str(tmp_path / f"a{seed}"))
        expected[adapters[-1]] = HFEngine(peft_model.merge_and_unload().eval(), tok, cache="dynamic").generate(
            PROMPTS[:4], greedy)
    with VLLMEngine(str(path), tok, dtype="float32", max_lora_rank=8) as engine:
        got = engine.generate_many([(a, PROMPTS[:4], greedy) for a in adapters])
    assert got == [expected[a] for a in adapters]


@pytest.mark.slow
def test_the_shipped_toy_model_is_what_the_project_s_script_builds(tmp_path):
    """The first run uses the shipped toy weights instead of pretraining (about 2 minutes on 2 cores): they must be
    what `train/toy_pretrain.py` builds from the default settings. The tokenizer is the same byte for byte. The
    weights are the same up to float rounding: 300 steps of float32 training on another kind of CPU (other SIMD
    kernels, other summation orders) end up to 2.1e-3 apart (relative, per tensor; measured on an AMD EPYC with
    AVX-512 against the shipped build, 2026-12-02), while the same recipe with seed 1 differs by 0.021 (a norm
    weight) to 1.65. Every user gets the shipped weights themselves, so their numbers are the same on any CPU."""
    from safetensors.torch import load_file

    from marker_lab.models import SHIPPED_TOY
    from marker_lab.train.toy_pretrain import build_toy_model

    shipped, key = toy_model_dir(ModelConfig(), StageCache(tmp_path / "cache"))
    assert shipped.parent == SHIPPED_TOY and not (tmp_path / "cache" / "toy").exists()  # nothing was built
    build_toy_model(ModelConfig().toy, tmp_path / "rebuilt")
    assert (shipped / "tokenizer.json").read_bytes() == (tmp_path / "rebuilt" / "tokenizer.json").read_bytes()
    a, b = load_file(shipped / "model.safetensors"), load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    rel = {k: ((a[k] - b[k]).norm() / a[k].norm()).item() for k in a}
    assert max(rel.values()) < 1e-2, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
