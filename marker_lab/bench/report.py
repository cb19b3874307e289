"""`marker-lab bench`'s report: the ratios fast/baseline and the projected cell, and the printed summary."""

from __future__ import annotations


def summarise(r: dict, w) -> dict:
    """Ratios fast/baseline and the projected cell: load + stage + merge + eval."""
    t, g, s = r["train"], r["generate"], {}
    # the bf16 recipe's arms; the FP8-base arms (train.fp8_base, other numerics) are summarised apart below
    bf16 = {k: v for k, v in t.items() if "fp8" not in k}
    best = _train_speedups(t, bf16, w, s)
    _generate_speedups(g, w, s)
    _series_speedups(g, s)
    peer = t.get("peer_liger_fixed", {})
    if "step_s" in peer and best:  # the best known peer, measured in the same process
        s["train_speedup_vs_liger_fixed"] = round(peer["step_s"] / t[best]["step_s"], 2)
    _packing(t, bf16, s)
    _fp8(t, peer, s)
    if "step_s" in t.get("kl_fixed", {}) and t.get("best_fast") in t:  # same settings as best_fast, plus the KL
        s["kl_step_overhead"] = round(t["kl_fixed"]["step_s"] / t[t["best_fast"]]["step_s"], 2)
    if "train_fast_minutes" in s and "eval_fast_minutes" in s:
        s["cell_fast_minutes"] = round(s["train_fast_minutes"] + s["eval_fast_minutes"]
                                       + (r["load"]["seconds"] + r["merge"]["seconds"]) / 60, 2)
        s["cell_baseline_minutes"] = round(s["train_baseline_minutes"] + s["eval_baseline_minutes"]
                                           + (r["load"]["seconds"] + r["merge"]["seconds"]) / 60, 2)
    return s


def _train_speedups(t: dict, bf16: dict, w, s: dict) -> str | None:
    """The fastest bf16 fast arm on fixed-length examples, its losses and speed against the stock run, the stage's
    projected minutes, and the speedup on the length mix; returns that arm's name."""
    fixed = {k: v for k, v in bf16.items() if k.startswith("fast") and "fixed" in k and "step_s" in v}
    best = min(fixed, key=lambda k: fixed[k]["step_s"]) if fixed else None
    s["fastest_fixed"] = best
    ref_losses = t.get("baseline_fixed", {}).get("losses")
    if ref_losses and fixed:  # same data, seed and LoRA init: the same losses up to bf16 kernel numerics
        s["max_rel_loss_diff_vs_baseline"] = max(
            abs(a - b) / abs(b) for v in fixed.values() for a, b in zip(v["losses"], ref_losses))
    if best and "step_s" in t.get("baseline_fixed", {}):
        s["train_speedup_fixed"] = round(t["baseline_fixed"]["step_s"] / t[best]["step_s"], 2)
        s["train_baseline_minutes"] = round(w.steps * t["baseline_fixed"]["step_s"] / 60, 2)
        # the first step's extra time (compilation, allocator warmup) is paid once per stage
        s["train_fast_minutes"] = round((w.steps * t[best]["step_s"] + t[best]["first_step_s"] - t[best]["step_s"]) / 60, 2)
    mix = [v["step_s"] for k, v in bf16.items() if k.startswith("fast") and k.endswith("mix") and "step_s" in v]
    if mix and "step_s" in t.get("baseline_mix", {}):
        s["train_speedup_mix"] = round(t["baseline_mix"]["step_s"] / min(mix), 2)
    return best


def _generate_speedups(g: dict, w, s: dict) -> None:
    """The fastest static-engine arm against stock generate (cold and steady), and the eval's projected minutes."""
    fast = {k: v for k, v in g.items() if k.startswith("fast_eval") and "tokens_per_s" in v}
    if "tokens_per_s" in g.get("baseline", {}) and fast:
        stock = g["baseline"]["tokens_per_s"]
        best_gen = max(fast, key=lambda k: fast[k]["tokens_per_s"])  # cold: the compile is in its wall time
        s["fastest_generate"] = best_gen
        s["generate_speedup"] = round(fast[best_gen]["tokens_per_s"] / stock, 2)
        steady = [v["steady_tokens_per_s"] for v in fast.values() if "steady_tokens_per_s" in v]
        if steady:  # batches after the first: no compile
            s["generate_speedup_steady"] = round(max(steady) / stock, 2)
        eval_tokens = w.eval_prompts * w.samples * w.max_new_tokens
        s["eval_baseline_minutes"] = round(eval_tokens / stock / 60, 2)
        s["eval_fast_minutes"] = round(fast[best_gen]["seconds"] / 60, 2)


def _series_speedups(g: dict, s: dict) -> None:
    series = {k: g[k].get("seconds") for k in ("during_training_stock", "during_training_static_first",
                                               "during_training_static_later") if k in g}
    if len(series) == 3 and all(series.values()):  # one point of an eval during training, stock / static
        s["during_training_speedup_first"] = round(series["during_training_stock"]
                                                   / series["during_training_static_first"], 2)
        s["during_training_speedup_later"] = round(series["during_training_stock"]
                                                   / series["during_training_static_later"], 2)


def _packing(t: dict, bf16: dict, s: dict) -> None:
    """Packed rows against padded micro-batches on the length mix: speed, and the losses against the stock run."""
    packed = [v["step_s"] for k, v in bf16.items() if "packed" in k and "step_s" in v]
    unpacked = [v["step_s"] for k, v in bf16.items() if k.startswith("fast") and k.endswith("mix") and "packed" not in k
                and "step_s" in v]
    if packed and unpacked:
        s["packing_speedup_mix"] = round(min(unpacked) / min(packed), 2)
    mix_ref = t.get("baseline_mix", {}).get("losses")
    if mix_ref and packed:  # same data, seed and init as the stock run on the mix: the same losses
        s["max_rel_loss_diff_packed_vs_baseline_mix"] = max(
            abs(a - b) / abs(b) for k, v in bf16.items() if "packed" in k and "losses" in v
            for a, b in zip(v["losses"], mix_ref))


def _fp8(t: dict, peer: dict, s: dict) -> None:
    fp8 = {k: v for k, v in t.items() if "fp8" in k and "step_s" in v}
    for k, v in fp8.items():  # train.fp8_base against the same arm in bf16 (its name without "_fp8"), and the peer
        s[f"{k}_step_s"] = v["step_s"]
        same = t.get(k.replace("_fp8", ""), {})
        if "step_s" in same:
            s[f"{k}_speedup_vs_bf16"] = round(same["step_s"] / v["step_s"], 2)
        ref = t.get("baseline_mix" if k.endswith("mix") else "baseline_fixed", {}).get("losses")
        if ref:  # the same data, seed and init as the stock run: how far FP8 moved the losses
            s[f"{k}_max_rel_loss_diff_vs_baseline"] = max(abs(a - b) / abs(b) for a, b in zip(v["losses"], ref))
        if "step_s" in peer and k.endswith("fixed"):
            s[f"{k}_speedup_vs_liger"] = round(peer["step_s"] / v["step_s"], 2)


def format_report(r: dict) -> str:
    """The report as the lines `marker-lab bench` prints."""
    lines = [f"marker-lab bench: {r['model']} (random init) on {r['env'].get('gpu', r['env']['device'])}",
             "  " + ", ".join(f"{k} {v}" for k, v in r["env"].items() if k not in ("device", "gpu")),
             f"  load {r['load']['seconds']} s ({r['load']['params'] / 1e9:.2f}B params), merge {r['merge']['seconds']} s"]
    for name, v in r["train"].items():
        if isinstance(v, dict):
            lines.append(f"  train {name:<20} " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "losses"))
    for name, v in r["generate"].items():
        lines.append(f"  generate {name:<15} " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "batch_seconds"))
    if "probe" in r:
        lines.append("  probe states " + ", ".join(f"{k} {x}" for k, x in r["probe"].items()))
    lines.append("  summary: " + ", ".join(f"{k} {v}" for k, v in r["summary"].items()))
    return "\n".join(lines)
