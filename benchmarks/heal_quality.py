"""Recovering quality with training: the linear-patched drops of recover_quality.py, healed by distillation from the
unpruned model (llmdrop.heal) at two token budgets, held-out perplexity as a ratio to the unpruned model.

Text, three disjoint parts of ../shared/data/calibration/c4_validation_2k.jsonl: calibration (cosine picks and patch
fits) = the first documents, 16 x 512 tokens; healing = the tokens after the first --skip-tokens (past calibration),
as many as the budget needs; held-out perplexity = 16 x 512 tokens of documents 1700-1999. The script checks that
healing ends before the held-out documents.

Resumable: every finished row is kept in benchmarks/results/<name>.json and skipped on the next run; a heal that was
stopped resumes from its saved state (llmdrop heal --resume).

python benchmarks/heal_quality.py [--model smollm2-135m] [--ks 8,15] [--budgets 20000,80000] [--lrs 2e-5,1e-4]
                                  [--skip-tokens 65536] [--name heal_quality] [--render-only]

Each (k, budget, learning rate) is its own heal from the patched model; rows at the first learning rate of a run
are kept under "k/budget" (older runs used 2e-5 only), others under "k/budget/lr".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, write_section  # noqa: E402
from recover_quality import BATCH, CAL, HELDOUT_DOCS, _heldout_file  # noqa: E402

from llmdrop.arch import arch_for  # noqa: E402
from llmdrop.calibration import documents, load_calibration, token_stream  # noqa: E402
from llmdrop.checkpoint import load_checkpoint, save  # noqa: E402
from llmdrop.choice import Choice  # noqa: E402
from llmdrop.evaluate import perplexity  # noqa: E402
from llmdrop.heal import HealConfig, heal, state_dir  # noqa: E402
from llmdrop.measure import measure  # noqa: E402
from llmdrop.models import load_model  # noqa: E402
from llmdrop.pipeline import prune  # noqa: E402
from llmdrop.plan import plan_drops  # noqa: E402
from llmdrop.report import table  # noqa: E402
from llmdrop.surgery import count_parameters, kv_cache_layers  # noqa: E402

TARGETS = {"smollm2-135m": {8: 1.08, 15: 1.25}, "gemma3-270m": {6: 1.15}}
DEFAULT_LR = 2e-5  # the rate of the first heals; their rows keep the key "k/budget"


def _rate(lr: float, final_lr: float = 0.0, train: str = "all") -> list[str]:
    """What names a heal's settings in its row key and folder: nothing for the first heals' (DEFAULT_LR, a decay to
    zero, every weight trained)."""
    return ([] if lr == DEFAULT_LR else [f"lr{lr:g}"]) + ([f"final{final_lr:g}"] if final_lr else []) + \
        ([f"train-{train}"] if train != "all" else [])


def _key(k: int, budget: int, lr: float, final_lr: float = 0.0, train: str = "all") -> str:
    return "/".join([str(k), str(budget), *_rate(lr, final_lr, train)])


def healed_folder(work: Path, k: int, budget: int, lr: float, final_lr: float = 0.0, train: str = "all") -> Path:
    """The checkpoint of attention k patched and healed for `budget` tokens at `lr` (tasks_quality reads it)."""
    return work / "-".join([f"attn{k}-linear-healed{budget}", *_rate(lr, final_lr, train)])


def _settings(row: dict) -> str:
    """A healed row's learning rate, with the final rate and what trained where they are not the defaults."""
    more = ([f"final {row['final_lr']:g}"] if row.get("final_lr") else []) + \
        ([row["train"]] if row.get("train", "all") != "all" else [])
    return f"{row.get('lr', DEFAULT_LR):g}" + (f" ({', '.join(more)})" if more else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ks", default="8,15")
    ap.add_argument("--budgets", default="20000,80000", help="healing tokens, one heal per budget from the patched model")
    ap.add_argument("--lrs", default="2e-5", help="peak learning rates, one heal per rate and budget")
    ap.add_argument("--final-lr", type=float, default=0.0, help="heal's --final-lr (a fraction of the peak)")
    ap.add_argument("--train", default="all", help="heal's --train (all, near, ...)")
    ap.add_argument("--skip-tokens", type=int, default=65536)
    ap.add_argument("--samples", type=int, default=16, help="calibration chunks (cosine picks and patch fits)")
    ap.add_argument("--heldout-samples", type=int, default=16, help="held-out chunks (perplexity)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--name", default="heal_quality")
    ap.add_argument("--render-only", action="store_true", help="write the section from the rows kept so far")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    work = RESULTS / "ckpt" / args.name
    work.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{args.name}.json"
    done = json.loads(store.read_text()) if store.exists() else {}

    def keep(key: str, row: dict) -> None:
        done[key] = {**row, "command": " ".join(["python", *sys.argv])}
        store.write_text(json.dumps(done, indent=1))

    model, tok = load_model(args.model, progress=False)
    arch = arch_for(model)
    cal = load_calibration(tok, CAL, args.samples, args.seq_len, bos=arch.needs_bos)
    with tempfile.TemporaryDirectory() as d:
        held = load_calibration(tok, _heldout_file(Path(d)), args.heldout_samples, args.seq_len, bos=arch.needs_bos)
    # Healing must stay between calibration and the held-out documents.
    skipped, skipped_docs = token_stream(tok, documents(CAL), args.skip_tokens)
    assert skipped_docs > cal.documents, "healing would start inside the calibration documents"
    top = max([*budgets, *(r["tokens"] for r in done.values() if r.get("tokens"))])
    _, last_doc = token_stream(tok, documents(CAL), args.skip_tokens + top + 4096)
    assert last_doc < HELDOUT_DOCS[0], f"healing would read document {last_doc}, inside the held-out ones"

    def ppl(m) -> float:
        return perplexity(m, held, BATCH, progress=False)["perplexity"]

    if "base" not in done:
        keep("base", {"perplexity": ppl(model), "params": count_parameters(model), "kv_layers": kv_cache_layers(model)})
    base_ppl = done["base"]["perplexity"]
    scores = None if args.render_only else measure(model, cal, batch_size=BATCH, progress=False)
    for k in [] if args.render_only else ks:
        plan = plan_drops(scores, "attn", k)
        patched = work / f"attn{k}-linear"
        # The patched checkpoint is built again when its folder is gone (the fit is deterministic; the row stays).
        if f"{k}/0" not in done or not (patched / "config.json").exists():
            m = load_model(args.model, progress=False)[0]
            t0 = time.perf_counter()
            prune(m, Choice(plan, scores), args.model, patch="linear", calibration=cal, batch_size=BATCH, progress=False)
            fit_s = time.perf_counter() - t0
            save(m, tok, patched, overwrite=True, dtype="float32")
            if f"{k}/0" not in done:
                keep(f"{k}/0", {"k": k, "tokens": 0, "perplexity": ppl(m), "layers": plan.attn, "fit_s": fit_s,
                                "samples": args.samples, "params": count_parameters(m), "kv_layers": kv_cache_layers(m)})
            del m
        for budget in budgets:
            for lr in lrs:
                key = _key(k, budget, lr, args.final_lr, args.train)
                if key in done:
                    continue
                out = healed_folder(work, k, budget, lr, args.final_lr, args.train)
                config = HealConfig(student=str(patched), teacher=args.model, output=str(out), tokens=budget,
                                    overwrite=True, lr=lr, final_lr=args.final_lr, train=args.train,
                                    calibration=str(CAL), skip_tokens=args.skip_tokens,
                                    save_every=10, resume=state_dir(out).exists(), progress=True)
                result = heal(config)
                healed, _ = load_checkpoint(out)
                keep(key, {"k": k, "tokens": result.tokens, "lr": lr, "final_lr": args.final_lr, "train": args.train,
                           "perplexity": ppl(healed), "steps": result.steps,
                           "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
                           "resumed_from": result.resumed_from, "first_kl": result.first_kl, "last_kl": result.last_kl,
                           "params": count_parameters(healed), "kv_layers": kv_cache_layers(healed)})
                print(key, done[key], flush=True)
                del healed

    rows = [["none (base)", "-", "-", done["base"]["perplexity"], 1.0, done["base"]["params"],
             done["base"]["kv_layers"], "-", "-"]]
    verdicts = []
    for k in sorted({r["k"] for key, r in done.items() if key != "base"}):  # every k measured so far, not only this run's
        healed = sorted((r for key, r in done.items() if key.startswith(f"{k}/") and r["tokens"]),
                        key=lambda r: (r["tokens"], r.get("lr", DEFAULT_LR), r.get("final_lr", 0.0), r.get("train", "all")))
        for r in [done[f"{k}/0"], *healed]:
            tokens = r["tokens"]
            cost = (f"fit {r['fit_s']:.0f}s" if tokens == 0 else
                    f"{r['seconds']:.0f}s, {r['steps']} steps, {r['tokens_per_s']:.0f} tok/s, KL {r['first_kl']:.3f}"
                    f" -> {r['last_kl']:.3f}" + (f" (resumed at step {r['resumed_from']}: time of the resumed part)"
                                                 if r.get("resumed_from") else ""))
            rows.append([f"attn {k}", f"{tokens:,}" if tokens else "0 (linear patch only)",
                         _settings(r) if tokens else "-", r["perplexity"], r["perplexity"] / base_ppl,
                         r["params"], r["kv_layers"], cost, str(r["layers"]) if tokens == 0 else ""])
        target = TARGETS.get(args.model, {}).get(k)
        if target and healed:
            top = max(r["tokens"] for r in healed)
            best = min(r["perplexity"] for r in healed) / base_ppl
            verdict = "met" if best <= target else f"missed by {best - target:.3f}"
            verdicts.append(f"- attention {k}, healed ({top:,} tokens at most): {best:.3f}x base, "
                            f"target <= {target}: {verdict}")
    # Rows measured by earlier runs keep their own command (the first heals did not record one).
    commands = dict.fromkeys(r.get("command", "python benchmarks/heal_quality.py") for r in done.values())
    more = f", patches on {args.samples} x {args.seq_len} calibration tokens" if args.samples != 16 else ""
    text = header(f"Recovering quality: healing{more} ({args.model})", " && ".join(commands))
    text += (f"Cosine picks, every dropped attention replaced by its linear patch (fitted on calibration: the first "
             f"{cal.documents} C4 documents of `../shared/data/calibration/c4_validation_2k.jsonl`, {args.samples} x "
             f"{args.seq_len} tokens), then `llmdrop heal` from the unpruned model: KL to the teacher, all weights but "
             f"the tied embeddings (near: only the decoder layers next to each patch), AdamW at the peak learning rate "
             "of each row (5% warm-up, cosine decay to zero or to the row's final fraction of the peak), 1 x 512 "
             "tokens per step, float32, "
             f"on the tokens after the first {args.skip_tokens:,} of the same file (documents {skipped_docs} to "
             f"{last_doc} at most). Each budget is its own heal from the patched model. Held-out perplexity: "
             f"{args.heldout_samples} x {args.seq_len} tokens of documents {HELDOUT_DOCS[0]}-{HELDOUT_DOCS[1] - 1}, which "
             "neither calibration nor healing read. KL = mean per-token KL of the first and last step's batch. The heals "
             "ran beside other benchmarks on the same 2 cores (1-2 threads), so their tokens/s are lower than on a "
             "quiet machine (SmolLM2-135M: about 130 tokens/s with 2 quiet threads).\n\n")
    text += table(["dropped", "tokens healed", "lr (final, trains)", "held-out ppl", "x base", "parameters",
                   "KV layers", "cost", "layers"], rows, markdown=True)
    if verdicts:
        text += "\n\nTargets (issue: healed ratios):\n" + "\n".join(verdicts)
    write_section(args.name, text)
    print(text)


if __name__ == "__main__":
    main()
