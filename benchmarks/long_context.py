"""Long contexts: a base model vs attention layers dropped (SmolLM2-135M: 8 and 15 of 30, and 15 replaced by linear
patches; Gemma-3-270M: 3 and 6 of 18, and 6 chosen for the KV cache they free), where the drop pays and what it costs.

Speed (bench, both runtimes, with the decode-time profile and its ideal speedup), passkey retrieval by context and
depth, 0-shot vs 5-shot accuracy, and perplexity by token position inside long documents.

python benchmarks/long_context.py [--model smollm2-135m|gemma3-270m] [--parts speed,quality]
    [--contexts 512,2048,8192] [--batches 1,8] [--repeats 5] [--tf-repeats 3] [--new-tokens 64]
    [--runtimes transformers,llama.cpp] [--threads 2] [--passkey-contexts 1024,4096,8192] [--depths 0,0.5,1]
    [--trials 5] [--fewshot-tasks arc_easy,hellaswag] [--fewshot-limit 200] [--ppl-seq-len 2048] [--ppl-docs 32]
    [--device cpu]
python benchmarks/long_context.py --smoke    # minutes: tiny settings, results under /tmp, BENCHMARKS.md untouched

Resumable in parts: `--parts speed` and `--parts quality` can run separately (the speed part wants a quiet machine,
the quality part does not); each keeps its results in benchmarks/results/long_context{_gemma3,}_{bench,quality}.json
(speed rows replaced only for the runtimes, batches and contexts measured again; quality per model, so a stopped run
goes on from the next model), and the section is written from whatever both hold. Gemma-3 runs in transformers only:
llama.cpp's gemma3 graph cannot skip one layer's attention (bench refuses it with that reason).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import RESULTS, header, write_section  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.bench import BENCH_HEADERS, PROFILE_HEADERS, bench_table_rows, compare, profile_table_rows  # noqa: E402
from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.checkpoint import save  # noqa: E402
from llmdrop.decoding import TURN_TOKENS  # noqa: E402
from llmdrop.evaluate import evaluate_tasks, perplexity  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.passkey import passkey_eval  # noqa: E402
from llmdrop.plan import plan_drops  # noqa: E402
from llmdrop.plots import plot_long_context  # noqa: E402
from llmdrop.pruned_model import PATCHED_ATTN, record_of  # noqa: E402
from llmdrop.report import (
    primary_metric,  # noqa: E402
    table,  # noqa: E402
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration"
CAL = SHARED / "c4_validation_2k.jsonl"
WIKI = SHARED / "exllamav2_wiki.utf8.txt"


@dataclass(frozen=True)
class Setup:
    """One model's rows: the attention drops (one-shot cosine), the drop also replaced by linear patches and the drop
    also chosen by the KV bytes it frees (objective kv at `kv_context`), where its files go and its defaults."""

    title: str
    layers: int
    prefix: str  # checkpoint folder names: <prefix>-attn<n>[-linear|-kv]
    drops: tuple[int, ...]
    linear: int | None
    kv: int | None
    kv_context: int
    section: str  # benchmarks/results/<section>.md and <section>_{bench,quality,plans}.json
    runtimes: str
    contexts: str
    not_measured: str = ""  # what this section leaves out, and why


SETUPS = {
    "smollm2-135m": Setup("SmolLM2-135M", 30, "smollm2", (8, 15), linear=15, kv=None, kv_context=8192,
                          section="long_context", runtimes="llama.cpp,transformers", contexts="512,2048,8192"),
    "gemma3-270m": Setup("Gemma-3-270M", 18, "gemma3", (3, 6), linear=None, kv=6, kv_context=8192,
                         section="long_context_gemma3", runtimes="transformers", contexts="512,2048,8192",
                         not_measured=(
                             "Not measured here: 32,768 tokens (fitting the prefill times above, t = a n + b n^2 "
                             "gives about 8 minutes per 32k prefill on these 2 cores; with a warm-up, a repeat, the "
                             "profile and the memory probe for 4 models that is over an hour and a half); it wants "
                             "a GPU. The passkey, few-shot and perplexity rows of base and attn-6 kv come from this "
                             "section's first run (its own commands above): scoring the picks with BOS changed "
                             "attn-3 and attn-6 but not attn-6 kv, so those two are the same models and only attn-3 "
                             "and attn-6 were measured again.")),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def checkpoints(model_name: str, setup: Setup, work: Path, cal_samples: int) -> tuple[dict[str, str], dict]:
    """The base alias, its one-shot attention drops (scored on the shared C4 text), the linear-patched twin (fitted on
    16 x 512 tokens of the same text) and the KV-chosen twin, built once. Returns (spec -> row label such as base,
    attn-8, attn-15 linear or attn-6 kv; plan label -> layers)."""
    from llmdrop.choice import Choice
    from llmdrop.configs import PlanSpec
    from llmdrop.criteria.cosine import choose_from_scores
    from llmdrop.pipeline import prune

    base, tok = load_model(model_name, progress=False)
    bos = arch_for(base).needs_bos  # chunks as `llmdrop measure` builds them, so the picks are llmdrop's own
    scores = measure(base, load_calibration(tok, CAL, cal_samples, 512, bos=bos), progress=False)
    kinds = [(n, "") for n in setup.drops] + [(setup.linear, "linear")] * bool(setup.linear)
    kinds += [(setup.kv, "kv")] * bool(setup.kv)
    specs, plans = {model_name: "base"}, {}
    for n, kind in kinds:
        if kind == "kv":
            spec = PlanSpec("attn", n=n, objective="kv", kv_context=setup.kv_context)
            plan = choose_from_scores(scores, spec, config=base.config, dtype_bytes=4).plan
        else:
            plan = plan_drops(scores, "attn", n)
        out = work / (f"{setup.prefix}-attn{n}" + (f"-{kind}" if kind else ""))
        plans[f"{n} {kind}".strip()] = plan.attn
        if _saved_attn(out) != (plan.attn, plan.attn if kind == "linear" else []):
            model, _ = load_model(model_name, progress=False)
            cal = load_calibration(tok, CAL, 16, 512, bos=bos) if kind == "linear" else None
            prune(model, Choice(plan, scores), model_name, patch="linear" if kind == "linear" else "zero",
                  calibration=cal, progress=False)
            save(model, tok, out, overwrite=True, dtype="float32")
        specs[str(out)] = f"attn-{n}" + (f" {kind}" if kind else "")
    return specs, plans


def _saved_attn(folder: Path) -> tuple[list[int], list[int]] | None:
    """(dropped, patched) attention layers of a checkpoint built before, None if there is none: a folder left by
    other picks must be rebuilt, not measured under the new picks' name."""
    record = record_of(_load(folder / "config.json"))
    return (record["attn"], record[PATCHED_ATTN]) if record else None


def long_documents(tokenizer, seq_len: int, docs: int, bos: bool) -> tuple[torch.Tensor, str]:
    """The first `seq_len` tokens of up to `docs` documents at least that long (Wikipedia articles, then C4 pages
    from the shared calibration data), one window per document, so position p really has p tokens of the same
    document before it."""
    texts = re.findall(r"<doc[^>]*>\n(.*?)</doc>", WIKI.read_text(encoding="utf-8"), re.S)
    texts += [json.loads(line)["text"] for line in CAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts.sort(key=len, reverse=True)
    body = seq_len - 1 if bos else seq_len
    windows = []
    for text in texts:
        if len(text) < body * 2:  # a cheap bound first: English runs ~4 characters per token
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= body:
            windows.append(([tokenizer.bos_token_id] if bos else []) + ids[:body])
        if len(windows) == docs:
            break
    if not windows:
        raise SystemExit(f"no document of the shared text has {seq_len} tokens; lower --ppl-seq-len")
    return torch.tensor(windows), f"{len(windows)} documents of >= {seq_len} tokens (shared Wikipedia + C4 text)"


def _command() -> str:
    return " ".join(["python", *sys.argv])


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def speed_part(specs: dict[str, str], args, results: Path, section: str) -> None:
    """bench in each runtime with the profile: llama.cpp with --repeats, transformers with --tf-repeats (its 8k
    prefills are minutes each on a CPU). Rows kept in <section>_bench.json; a rerun replaces the rows of the
    runtimes, batches and contexts it measured and keeps the others (each row says its repeats and command)."""
    store = results / f"{section}_bench.json"
    old = _load(store)
    kept = old.get("rows", [])
    rows = []
    for runtime in _names(args.runtimes):
        repeats = args.repeats if runtime == "llama.cpp" else args.tf_repeats
        batches = [1] if runtime == "llama.cpp" else _ints(args.batches)
        new = compare(list(specs), _ints(args.contexts), batches, args.new_tokens, repeats, runtimes=[runtime],
                      profile=True, threads=args.threads, output=results / f"{section}_bench_{runtime}.json")
        for r in new:
            r["model"], r["repeats"], r["new_tokens"], r["command"] = specs[r["model"]], repeats, args.new_tokens, _command()
            r["turns"] = TURN_TOKENS  # decode tokens per turn (before turns: one whole decode per model, "run")
        rows += new
    measured = {(r["runtime"], r["batch"], r["context"]) for r in rows}
    rows = [r for r in kept if (r["runtime"], r["batch"], r["context"]) not in measured] + rows
    order = {name: i for i, name in enumerate(specs.values())}
    rows.sort(key=lambda r: (r["runtime"] != "llama.cpp", r["batch"], order.get(r["model"], 99), r["context"]))
    store.write_text(json.dumps({"rows": rows, "notes": old.get("notes", [])}, indent=1))


def quality_part(specs: dict[str, str], args, results: Path, section: str) -> None:
    """Passkey, 0- vs 5-shot and perplexity by position, one model in memory at a time; each model's results are
    kept in <section>_quality.json as soon as they are measured. A model measured before without few-shot tasks
    gets only those added (its passkey and perplexity are kept)."""
    store = results / f"{section}_quality.json"
    done = _load(store)
    tasks = _names(args.fewshot_tasks)
    depths = [float(d) for d in args.depths.split(",")]
    for spec, name in specs.items():
        if name in done and (not tasks or done[name].get("fewshot")):
            continue
        model, tok = load_model(spec, device=args.device, progress=False)
        bos = arch_for(model).needs_bos
        res = done.get(name) or {}
        if "passkey" not in res:
            res["passkey"] = passkey_eval(model, tok, _ints(args.passkey_contexts), depths=depths,
                                          trials=args.trials, bos=bos)
        if tasks:
            res["fewshot"] = {k: evaluate_tasks(model, tok, tasks, limit=args.fewshot_limit, num_fewshot=k,
                                                data="local", bos=bos)["tasks"] for k in (0, 5)}
        if "positions" not in res:
            windows, res["source"] = long_documents(tok, args.ppl_seq_len, args.ppl_docs, bos)
            res["positions"] = perplexity(model, windows, batch_size=1, by_position=True)
            res["settings"] = {"trials": args.trials, "ppl_seq_len": args.ppl_seq_len}
            res["command"] = _command()
        else:  # few-shot added to an earlier measurement: its own command
            res["fewshot_command"] = _command()
        res["settings"].update({"fewshot_limit": args.fewshot_limit, "tasks": tasks})
        done[name] = res
        store.write_text(json.dumps(done, indent=1))
        print(f"quality of {name} done", flush=True)
        del model


def _plans_text(setup: Setup, plans: dict, cal_samples: int) -> str:
    parts = [f"{label} = {layers}" for label, layers in plans.items() if label.isdigit()]
    text = (f"Attention layers dropped (one-shot cosine, {cal_samples} x 512 tokens of the shared C4 text): "
            + ", ".join(parts))
    if setup.linear:
        text += (f"; attn-{setup.linear} linear = the same {setup.linear} replaced by linear patches (16 x 512 "
                 "calibration tokens)")
    if setup.kv:
        text += (f"; attn-{setup.kv} kv = {setup.kv} chosen by cosine lost per KV byte freed at "
                 f"{setup.kv_context:,} tokens (`--objective kv`): {plans.get(f'{setup.kv} kv')}")
    return text + ". "


def _spread(r: dict) -> float:
    """The per-repeat ratios' span as a share of the effect (ratio - 1)."""
    return (r["decode_ratio_max"] - r["decode_ratio_min"]) / (r["decode_ratio"] - 1)


def _reading(rows: list[dict]) -> str:
    """Achieved vs ideal and the spread at the longest context, batch 1, per runtime; and the KV-chosen drop beside
    the cosine one where both are there."""
    top = max(r["context"] for r in rows)
    text = ""
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        at = [r for r in rows if r["runtime"] == runtime and r["context"] == top and r["batch"] == 1
              and r["model"] != "base" and r.get("ideal_speedup")]
        if not at:
            continue
        spreads = [_spread(r) for r in at if r["decode_ratio"] > 1]
        text += (f"\n\nReading ({runtime}, {top:,} tokens): "
                 + ", ".join(f"{r['model']} {r['decode_ratio']:.2f}x of an ideal {r['ideal_speedup']:.2f}x "
                             f"({100 * r['achieved_over_ideal']:.0f}%)" for r in at)
                 + ("; target >= 90% in llama.cpp" if runtime == "llama.cpp" else "")
                 + ". The per-repeat spread is " + ", ".join(f"{x:.0%}" for x in spreads) + " of the effect (target "
                 + ("< 10%: met)." if spreads and max(spreads) < 0.1 else "< 10%: missed)."))
        by_name = {r["model"]: r for r in at}
        for name, r in by_name.items():
            twin = by_name.get(name.removesuffix(" kv")) if name.endswith(" kv") else None
            if twin:
                text += (f" Chosen for the KV bytes they free, the same number of attention layers leave "
                         f"{r['kv_ratio']:.2f}x of the base KV cache instead of {twin['kv_ratio']:.2f}x and decode at "
                         f"{r['decode_ratio']:.2f}x instead of {twin['decode_ratio']:.2f}x.")
    return text + ("\n" if text else "")


def render(setup: Setup, plans: dict, args, results: Path) -> str:
    bench = _load(results / f"{setup.section}_bench.json")
    quality = _load(results / f"{setup.section}_quality.json")
    rows = bench.get("rows", [])
    commands = dict.fromkeys([*(r.get("command") for r in rows),
                              *(q.get(key) for q in quality.values() for key in ("command", "fewshot_command"))])
    drops = " and ".join(str(n) for n in setup.drops)
    text = header(f"Long contexts: {setup.title}, attention dropped ({drops} of {setup.layers})",
                  " && ".join(c for c in commands if c) or _command())
    threads = " or ".join(str(n) for n in sorted({r["threads"] for r in rows})) if rows else args.threads
    runtimes = ("float32 in transformers, f16 GGUF in llama.cpp (llama-cpp-python, flash attention on, batch 1)"
                if any(r["runtime"] == "llama.cpp" for r in rows) else
                "float32 in transformers (llama.cpp cannot run these drops: its gemma3 graph has no way to skip one "
                "layer's attention)")
    text += (_plans_text(setup, plans, args.cal_samples) + f"{runtimes}. Threads pinned to {threads} "
             "(torch.set_num_threads; llama.cpp n_threads = n_threads_batch; each run's count below). Base vs "
             "pruned in one interleaved run per runtime.\n\n" + (setup.not_measured + "\n\n" if setup.not_measured else ""))
    if rows:
        runs: dict[tuple, list[int]] = {}
        for r in rows:
            contexts = runs.setdefault((r["runtime"], r["repeats"], r["new_tokens"], r["turns"], r["threads"]), [])
            contexts += [r["context"]] * (r["context"] not in contexts)
        text += "### Speed\n\n"
        text += ("Decode = `new` tokens one at a time with the KV cache after a random prompt of `context` tokens, "
                 "the models prefilled one after the other and then decoding either one after the other or taking "
                 "turns of a few tokens (the first to go rotating), which puts a slow spell of the shared machine on "
                 "every model of the repeat alike; median and min-max of the repeats after 1 warm-up ("
                 + "; ".join(f"{rt} at {', '.join(f'{c:,}' for c in sorted(cs))}: {n} repeats, new = {t}, "
                             + ("one after the other" if how == "run" else f"turns of {how} tokens")
                             + f", {th} thread{'s' * (th > 1)}"
                             for (rt, n, t, how, th), cs in sorted(runs.items(), key=str))
                 + "); x = ratio to base, x min-max = the lowest and highest per-repeat ratio.\n\n")
        text += table(BENCH_HEADERS, bench_table_rows(rows), markdown=True)
        has_cpp = any(r["runtime"] == "llama.cpp" for r in rows)
        text += ("\n\n### Where decode time goes, and the ideal\n\n"
                 "Share of decode time per module kind in each runtime. transformers: timed forward pre/post hooks "
                 "(time.perf_counter) over the profile's decode steps; other = embedding, rotary tables, residual "
                 "adds, Python between modules. "
                 + ("llama.cpp: llama.cpp's own profile of the GGUF (its graph evaluation callback asked for the node "
                    "ending every sublayer, perf_counter between them; `llmdrop.llama_profile`); other = graph "
                    "building and scheduling, residual adds. " if has_cpp else "")
                 + "dropped % = the base model's share of the modules the pruned model no longer runs (each dropped "
                   "attention with its input norm); ideal x = 1 / (1 - dropped share); achieved x = the measured "
                   "decode ratio above. The profiled step is slower than the benched one ("
                 + ("the boundaries split llama.cpp's graph into ~150 pieces; " if has_cpp else "")
                 + "hooks in transformers): both columns are shown.\n\n")
        text += table(PROFILE_HEADERS, profile_table_rows(rows), markdown=True)
        text += _reading(rows)
        text += "".join(f"\n{note}\n" for note in bench.get("notes", []))  # written by hand into the JSON
    if quality:
        first = next(iter(quality.values()))
        passkey = {name: res["passkey"] for name, res in quality.items()}
        depths = first["passkey"]["depths"]
        text += "\n\n### Passkey retrieval\n\n"
        text += (f"A 5-digit key in filler text at depth 0 (start) .. 1 (end), {first['settings']['trials']} seeded "
                 "prompts per cell; greedy answer, exact match; transformers, float32.\n\n")
        pk_rows = [[name, int(c), *[res["accuracy"][c][str(d)] for d in depths], res["by_context"][c]]
                   for name, res in passkey.items() for c in res["accuracy"]]
        text += table(["model", "context", *[f"depth {d:g}" for d in depths], "all"], pk_rows, markdown=True)
        fewshot = {name: res for name, res in quality.items() if res.get("fewshot")}
        if fewshot:
            first_fs = next(iter(fewshot.values()))
            limit = first_fs["settings"]["fewshot_limit"]
            text += (f"\n\n### In-context learning: 0-shot vs 5-shot\n\nlm-eval, local data, first {limit} items "
                     "(standard error about 0.05 at this size).\n\n")
            fs_rows = []
            for name, res in fewshot.items():
                for task in first_fs["settings"]["tasks"]:
                    m0, m5 = res["fewshot"]["0"][task]["metrics"], res["fewshot"]["5"][task]["metrics"]
                    metric = primary_metric(m0)
                    fs_rows.append([name, task, metric, m0[metric], m5[metric], m5[metric] - m0[metric]])
            text += table(["model", "task", "metric", "0-shot", "5-shot", "gain"], fs_rows, markdown=True)
        text += (f"\n\n### Perplexity by token position\n\n{first['source']}; window "
                 f"{first['settings']['ppl_seq_len']} tokens, one per document; positions = tokens of the same "
                 "document before the scored one.\n\n")
        buckets = [f"{b['start']}-{b['end'] - 1}" for b in first["positions"]["by_position"]]
        pos_rows = [[name, *[b["perplexity"] for b in res["positions"]["by_position"]], res["positions"]["perplexity"]]
                    for name, res in quality.items()]
        text += table(["model", *buckets, "all"], pos_rows, markdown=True)
        if rows:
            plot = plot_long_context(rows, passkey, results / f"{setup.section}.png",
                                     f"{setup.title}: decode speedup and passkey accuracy against context")
            where = plot.relative_to(RESULTS.parents[1]).as_posix() if results == RESULTS else plot.name
            text += f"\n\n![speedup and passkey accuracy against context]({where})\n"
    return text


def _discard_results(results: Path, section: str) -> None:
    """The picks changed (other calibration, other scoring): the stored rows describe other models, and keeping them
    under the same row names would mix two sets of models in one table."""
    for name in (f"{section}_bench.json", f"{section}_quality.json"):
        if (results / name).exists():
            (results / name).unlink()
            print(f"the attention picks changed: removed {name}, measured on the old picks", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(SETUPS))
    ap.add_argument("--parts", default="speed,quality")
    ap.add_argument("--contexts", default=None, help="default: the model's (up to 8192)")
    ap.add_argument("--batches", default="1,8", help="transformers batches (llama.cpp runs batch 1)")
    ap.add_argument("--repeats", type=int, default=5, help="llama.cpp repeats")
    ap.add_argument("--tf-repeats", type=int, default=3, help="transformers repeats")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runtimes", default=None, help="default: llama.cpp,transformers (Gemma-3: transformers)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--passkey-contexts", default="1024,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--fewshot-tasks", default="arc_easy,hellaswag")
    ap.add_argument("--fewshot-limit", type=int, default=200)
    ap.add_argument("--ppl-seq-len", type=int, default=2048)
    ap.add_argument("--ppl-docs", type=int, default=32)
    ap.add_argument("--cal-samples", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="for passkey, few-shot and perplexity (bench runs on the CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings; results in a temporary folder")
    args = ap.parse_args()
    if args.smoke:
        args.contexts, args.batches, args.repeats, args.tf_repeats, args.new_tokens = "64,128", "1", 1, 1, 4
        args.passkey_contexts, args.trials, args.fewshot_tasks, args.fewshot_limit = "256", 1, "arc_easy", 4
        args.ppl_seq_len, args.ppl_docs, args.cal_samples, args.depths = 256, 2, 2, "0,1"
    setup = SETUPS[args.model]
    args.runtimes = args.runtimes or setup.runtimes
    args.contexts = args.contexts or setup.contexts
    results = Path(tempfile.mkdtemp(prefix="long_context_smoke-")) if args.smoke else RESULTS
    work = results / "ckpt"  # checkpoints are rebuilt on demand and not committed (shared with speed_smollm2)
    parts = _names(args.parts)
    plans_file = results / f"{setup.section}_plans.json"
    if {"speed", "quality"} & set(parts) or not plans_file.exists():
        specs, plans = checkpoints(args.model, setup, work, args.cal_samples)
        if plans_file.exists() and json.loads(plans_file.read_text()) != plans:
            _discard_results(results, setup.section)
        plans_file.write_text(json.dumps(plans))
    plans = json.loads(plans_file.read_text())
    if "speed" in parts:
        speed_part(specs, args, results, setup.section)
    if "quality" in parts:
        quality_part(specs, args, results, setup.section)
    text = render(setup, plans, args, results)
    if args.smoke:
        (results / f"{setup.section}.md").write_text(text)
        print(f"smoke results in {results}")
    else:
        write_section(setup.section, text)
    print(text)


if __name__ == "__main__":
    main()
