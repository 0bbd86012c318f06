"""PNG plots: per-layer similarity (the paper's Figure 2/3 shape) and quality versus modules dropped."""

from __future__ import annotations

from pathlib import Path

from .files import atomic_file
from .measure import Scores


def _figure(**kwargs):
    # A bare Figure renders to PNG through its own Agg canvas: no pyplot state and no matplotlib.use(), so a
    # notebook's backend and open figures are left alone.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path, overwrite=True) as tmp:  # a plot is replaced whole, never left half-written
        fig.savefig(tmp, dpi=120, format="png")
    return path


def plot_similarity(scores: Scores, path: str | Path, title: str = "") -> Path:
    """Cosine similarity of attention, MLP and block per layer; the dashed line marks cos = 1 (a no-op)."""
    fig = _figure(figsize=(8, 4))
    ax = fig.subplots()
    layers = list(range(scores.num_layers))
    for kind, label in (("attn", "attention"), ("mlp", "MLP"), ("block", "block")):
        ax.plot(layers, scores.of(kind), marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity (input vs output)")
    ax.set_title(title or f"{scores.model}: redundancy per layer ({scores.tokens:,} tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_quality(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Average accuracy and perplexity against the number of dropped modules, one line per strategy; a shaded band
    spans the seeds of a seeded (random) strategy. A strategy with linear patches (`attn+linear`) is drawn in the
    colour of the same strategy without them (`attn`), dotted, with hollow markers."""
    fig = _figure(figsize=(11, 4))
    acc_ax, ppl_ax = fig.subplots(1, 2)
    base = next((r for r in rows if r["k"] == 0), None)
    strategies = sorted({r["strategy"] for r in rows if r["k"] > 0})
    markers = "osD^vPX*"
    cycle = [f"C{n}" for n in range(10)]
    colours: dict[str, str] = {}
    for strategy in strategies:
        colours.setdefault(strategy.removesuffix("+linear"), cycle[len(colours) % len(cycle)])
    for i, strategy in enumerate(strategies):
        # Each later strategy draws smaller and thinner, so one that picked the same modules as an earlier one
        # (joint often picks only attention) shows nested inside it instead of hiding it.
        patched = strategy.endswith("+linear")
        look = {"marker": markers[i % len(markers)], "markersize": max(8 - 1.2 * i, 3),
                "linewidth": max(2.2 - 0.35 * i, 0.8), "label": strategy,
                "color": colours[strategy.removesuffix("+linear")]}
        if patched:
            look["markerfacecolor"] = "none"
        pts = sorted(((r["k"], r) for r in rows if r["strategy"] == strategy), key=lambda p: p[0])
        if base:
            pts = [(0, base), *pts]
        style = ":" if patched else "--" if strategy.startswith("random") else "-"
        ks = [k for k, _ in pts]
        for ax, key in ((acc_ax, "average"), (ppl_ax, "perplexity")):
            if not all(r.get(key) is not None for _, r in pts):
                continue
            (line,) = ax.plot(ks, [r[key] for _, r in pts], style, **look)
            if any(key in r.get("range", {}) for _, r in pts):  # seeded rows: shade from worst to best seed
                lo_hi = [r.get("range", {}).get(key, [r[key], r[key]]) for _, r in pts]
                ax.fill_between(ks, [lo for lo, _ in lo_hi], [hi for _, hi in lo_hi], color=line.get_color(),
                                alpha=0.15, linewidth=0)
    acc_ax.set_xlabel("modules dropped")
    acc_ax.set_ylabel("average accuracy")
    ppl_ax.set_xlabel("modules dropped")
    ppl_ax.set_ylabel("perplexity (log scale)")
    ppl_ax.set_yscale("log")
    for ax in (acc_ax, ppl_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a study with only its base row has no lines yet
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def model_colours(bench_rows: list[dict], passkey: dict, names: dict[str, str]) -> dict[str, str]:
    """One matplotlib colour per model label, the same in every panel (the base, first in the rows, takes C0)."""
    labels = dict.fromkeys([*(names.get(r["model"], r["model"]) for r in bench_rows),
                            *(names.get(m, m) for m in passkey)])
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def plot_long_context(bench_rows: list[dict], passkey: dict[str, dict], path: str | Path, title: str = "",
                      names: dict[str, str] | None = None) -> Path:
    """Decode speedup against context (one line per model and runtime, batch 1, bars from the lowest to the highest
    per-repeat ratio; the profile's ideal dashed where the rows have it) and passkey accuracy against context (one
    line per model). `bench_rows`: bench.compare's rows; `passkey`: model -> passkey.passkey_eval result; `names`:
    short labels for the model specs."""
    names = names or {}
    fig = _figure(figsize=(11, 4))
    speed_ax, key_ax = fig.subplots(1, 2)
    rows = [r for r in bench_rows if r["batch"] == 1]
    first = bench_rows[0]["model"] if bench_rows else None
    colour = model_colours(bench_rows, passkey, names)
    markers = {rt: m for rt, m in zip(dict.fromkeys(r["runtime"] for r in rows), "osD^v")}  # one per runtime
    for (model, runtime) in dict.fromkeys((r["model"], r["runtime"]) for r in rows):
        if model == first:
            continue
        pts = sorted((r for r in rows if r["model"] == model and r["runtime"] == runtime), key=lambda r: r["context"])
        xs = [r["context"] for r in pts]
        ys = [r["decode_ratio"] for r in pts]
        lo = [y - (r.get("decode_ratio_min") or y) for y, r in zip(ys, pts)]
        hi = [(r.get("decode_ratio_max") or y) - y for y, r in zip(ys, pts)]
        label = names.get(model, model)
        bars = speed_ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[runtime], capsize=3, color=colour[label],
                                 label=f"{label} ({runtime})")
        if all(r.get("ideal_speedup") for r in pts):
            speed_ax.plot(xs, [r["ideal_speedup"] for r in pts], "--", color=bars[0].get_color(), alpha=0.6,
                          linewidth=1)
    speed_ax.axhline(1.0, color="grey", linewidth=0.8)
    speed_ax.set_xscale("log", base=2)
    speed_ax.set_xlabel("context (tokens)")
    speed_ax.set_ylabel("decode speedup over base (dashed: profile's ideal)")
    for model, res in passkey.items():
        pts = sorted((int(c), acc) for c, acc in res["by_context"].items())
        key_ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", label=names.get(model, model),
                    color=colour[names.get(model, model)])
    key_ax.set_xscale("log", base=2)
    key_ax.set_ylim(-0.05, 1.05)
    key_ax.set_xlabel("context (tokens)")
    key_ax.set_ylabel("passkey accuracy (all depths)")
    for ax in (speed_ax, key_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
