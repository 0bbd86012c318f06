"""Long contexts: SmolLM2-135M base vs 8 and 15 of 30 attention layers dropped, where the drop pays and what it costs.

Speed (bench, both runtimes, with the decode-time profile and its ideal speedup), passkey retrieval by context and
depth, 0-shot vs 5-shot accuracy, and perplexity by token position inside long documents.

python benchmarks/long_context.py [--contexts 512,2048,8192] [--batches 1,8] [--repeats 5] [--new-tokens 64]
    [--runtimes transformers,llama.cpp] [--threads 2] [--passkey-contexts 1024,4096,8192] [--trials 5]
    [--fewshot-tasks arc_easy,hellaswag] [--fewshot-limit 200] [--ppl-seq-len 2048] [--ppl-docs 32] [--device cpu]
python benchmarks/long_context.py --smoke    # minutes: tiny settings, results under /tmp, BENCHMARKS.md untouched
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from common import RESULTS, header, write_section  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.bench import BENCH_HEADERS, PROFILE_HEADERS, bench_table_rows, compare, profile_table_rows  # noqa: E402
from llmdrop.calibration import load_calibration  # noqa: E402
from llmdrop.checkpoint import save  # noqa: E402
from llmdrop.evaluate import evaluate_tasks, perplexity, primary_metric  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.passkey import passkey_eval  # noqa: E402
from llmdrop.plan import plan_drops  # noqa: E402
from llmdrop.plots import plot_long_context  # noqa: E402
from llmdrop.report import table  # noqa: E402
from llmdrop.surgery import apply_plan  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration"
CAL = SHARED / "c4_validation_2k.jsonl"
WIKI = SHARED / "exllamav2_wiki.utf8.txt"
DROPS = (8, 15)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def checkpoints(work: Path, cal_samples: int) -> tuple[list[str], dict]:
    """The base alias and its attention-8 / -15 one-shot drops (scored on the shared C4 text), built once."""
    base, tok = load_model("smollm2-135m", progress=False)
    scores = measure(base, load_calibration(tok, CAL, cal_samples, 512), progress=False)
    specs, plans = ["smollm2-135m"], {}
    for n in DROPS:
        out = work / f"smollm2-attn{n}"
        plans[n] = plan_drops(scores, "attn", n).attn
        if not (out / "config.json").exists():
            model, _ = load_model("smollm2-135m", progress=False)
            apply_plan(model, plan_drops(scores, "attn", n))
            save(model, tok, out, overwrite=True)
        specs.append(str(out))
    return specs, plans


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runtimes", default="transformers,llama.cpp")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--passkey-contexts", default="1024,4096,8192")
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
        args.contexts, args.batches, args.repeats, args.new_tokens = "64,128", "1", 1, 4
        args.passkey_contexts, args.trials, args.fewshot_tasks, args.fewshot_limit = "256", 1, "arc_easy", 4
        args.ppl_seq_len, args.ppl_docs, args.cal_samples = 256, 2, 2
    results = Path(tempfile.mkdtemp(prefix="long_context_smoke-")) if args.smoke else RESULTS
    work = results / "ckpt"  # checkpoints are rebuilt on demand and not committed (shared with speed_smollm2)
    specs, plans = checkpoints(work, args.cal_samples)
    names = {specs[0]: "base", specs[1]: "attn-8", specs[2]: "attn-15"}
    contexts, batches = _ints(args.contexts), _ints(args.batches)

    # 1. speed, both runtimes, with the profile
    rows = compare(specs, contexts, batches, args.new_tokens, args.repeats, runtimes=_names(args.runtimes),
                   profile=True, threads=args.threads, output=results / "long_context_bench.json")
    for r in rows:
        r["model"] = names[r["model"]]
    threads = rows[0]["threads"]

    # 2. passkey, 3. few-shot, 4. perplexity by position: one model in memory at a time
    passkey, fewshot, positions = {}, {}, {}
    tasks = _names(args.fewshot_tasks)
    for spec in specs:
        model, tok = load_model(spec, device=args.device, progress=False)
        bos = arch_for(model).needs_bos
        passkey[names[spec]] = passkey_eval(model, tok, _ints(args.passkey_contexts), trials=args.trials, bos=bos)
        if tasks:
            fewshot[names[spec]] = {k: evaluate_tasks(model, tok, tasks, limit=args.fewshot_limit, num_fewshot=k,
                                                      data="local", bos=bos)["tasks"] for k in (0, 5)}
        windows, source = long_documents(tok, args.ppl_seq_len, args.ppl_docs, bos)
        positions[names[spec]] = perplexity(model, windows, batch_size=1, by_position=True)
        del model

    text = header("Long contexts: SmolLM2-135M, attention dropped (8 and 15 of 30)")
    text += (f"Attention layers dropped (one-shot, {args.cal_samples} x 512 tokens of the shared C4 text): "
             f"8 = {plans[8]}, 15 = {plans[15]}. float32. Threads pinned to {threads} "
             f"(torch.set_num_threads; llama.cpp n_threads = n_threads_batch). llama.cpp: the f16 GGUF export through "
             f"llama-cpp-python, flash attention on, batch 1.\n\n")
    text += "### Speed\n\n"
    text += (f"Decode = {args.new_tokens} tokens one at a time with the KV cache after a random prompt of `context` "
             f"tokens; median and min-max of {args.repeats} interleaved runs after 1 warm-up; x = ratio to base, "
             "x min-max = the lowest and highest per-repeat ratio (each repeat runs the models back to back).\n\n")
    text += table(BENCH_HEADERS, bench_table_rows(rows), markdown=True)
    text += ("\n\n### Where decode time goes, and the ideal\n\n"
             "Share of decode time per module kind, from timed forward pre/post hooks (time.perf_counter) in "
             "transformers over the profile's decode steps; other = embedding, rotary tables, residual adds, Python "
             "between modules. dropped % = the base model's share of the modules the pruned model no longer runs "
             "(each dropped attention with its input norm); ideal x = 1 / (1 - dropped share); achieved x = the "
             "measured decode ratio above. llama.cpp rows: llama.cpp's own profile of the GGUF (its graph "
             "evaluation callback asked for the node ending every sublayer, perf_counter between them; "
             "llmdrop.llama_profile), so llama.cpp computes a step in ~150 pieces and the profiled step is slower "
             "than the benched one (profiled step ms below).\n\n")
    text += table(PROFILE_HEADERS, profile_table_rows(rows), markdown=True)
    text += "\n\n### Passkey retrieval\n\n"
    depths = next(iter(passkey.values()))["depths"]
    text += (f"A 5-digit key in filler text at depth 0 (start) .. 1 (end), {args.trials} seeded prompts per cell; "
             "greedy answer, exact match.\n\n")
    pk_rows = [[name, int(c), *[res["accuracy"][c][str(d)] for d in depths], res["by_context"][c]]
               for name, res in passkey.items() for c in res["accuracy"]]
    text += table(["model", "context", *[f"depth {d:g}" for d in depths], "all"], pk_rows, markdown=True)
    if fewshot:
        text += f"\n\n### In-context learning: 0-shot vs 5-shot\n\nlm-eval, local data, first {args.fewshot_limit} items.\n\n"
        fs_rows = []
        for name, by_k in fewshot.items():
            for task in tasks:
                m0, m5 = by_k[0][task]["metrics"], by_k[5][task]["metrics"]
                metric = primary_metric(m0)
                fs_rows.append([name, task, metric, m0[metric], m5[metric], m5[metric] - m0[metric]])
        text += table(["model", "task", "metric", "0-shot", "5-shot", "gain"], fs_rows, markdown=True)
    text += (f"\n\n### Perplexity by token position\n\n{source}; window {args.ppl_seq_len} tokens, one per document; "
             "positions = tokens of the same document before the scored one.\n\n")
    buckets = [f"{b['start']}-{b['end'] - 1}" for b in next(iter(positions.values()))["by_position"]]
    pos_rows = [[name, *[b["perplexity"] for b in res["by_position"]], res["perplexity"]]
                for name, res in positions.items()]
    text += table(["model", *buckets, "all"], pos_rows, markdown=True)
    plot = plot_long_context(rows, passkey, results / "long_context.png",
                             "SmolLM2-135M: decode speedup and passkey accuracy against context")
    where = plot.relative_to(RESULTS.parents[1]).as_posix() if not args.smoke else plot.name
    text += f"\n\n![speedup and passkey accuracy against context]({where})\n"
    (results / "long_context.json").write_text(json.dumps({"bench": rows, "passkey": passkey, "fewshot": fewshot,
                                                           "positions": positions, "plans": plans}, indent=1))
    if args.smoke:
        (results / "long_context.md").write_text(text)
        print(f"smoke results in {results}")
    else:
        write_section("long_context", text)
    print(text)


if __name__ == "__main__":
    main()
