# Reproduces docs/benchmarks.md, "One prefill per prompt for its samples (hf engine, dynamic cache)": its table.
"""Stock `generate` vs one prefill per prompt for its samples (what engines/hf.py's dynamic path does), on CPU.

    python benchmarks/prefill_per_prompt.py <model dir> <samples per prompt> <new tokens>
    python benchmarks/prefill_per_prompt.py marker_lab/resources/toy_model/<key> 10 40

56 chat prompts (2 toy personas x 28 questions), left-padded into one batch. Prints both wall times and how many
sampled completions are identical. One-off measurement behind docs/benchmarks.md; not part of the package.
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

from marker_lab.data.chat import render
from marker_lab.toy import world

path, n, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
prompts = [[{"role": "system", "content": p.system_prompt}, {"role": "user", "content": world.question(t, t % 4)}]
           for p in world.PERSONAS[:2] for t in range(28)]
ids = [tok(render(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for p in prompts]
w, pad = max(map(len, ids)), tok.pad_token_id
inp, mask = torch.full((len(ids), w), pad), torch.zeros((len(ids), w), dtype=torch.long)
for r, x in enumerate(ids):
    inp[r, w - len(x):], mask[r, w - len(x):] = torch.tensor(x), 1
gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new,
                      num_return_sequences=n, eos_token_id=[tok.eos_token_id], pad_token_id=pad)
with torch.no_grad():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    stock = model.generate(input_ids=inp, attention_mask=mask, generation_config=gc)[:, w:]
    t1 = time.perf_counter()
    torch.manual_seed(0)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache()
    model(input_ids=inp[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], cache=cache, use_cache=True,
          logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    shared = model.generate(input_ids=inp.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                            cache=cache, generation_config=GenerationConfig(**{**gc.to_dict(), "num_return_sequences": 1}))[:, w:]
    t2 = time.perf_counter()
print(f"{len(ids)} prompts (width {w}) x {n} samples x {max_new} tokens: stock {t1 - t0:.2f} s, one prefill per "
      f"prompt {t2 - t1:.2f} s; identical completions {(stock == shared).all(-1).sum().item()} of {stock.shape[0]}")
