"""Streamed vs in-memory measurement (time, peak RSS), 1 vs 2 data-parallel ranks, and a Llama-3-8B-shaped model
measured streamed on a machine whose RAM (24 GiB) could not comfortably hold it in float32.

python benchmarks/stream_bench.py [--skip-8b] [--only-8b]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, write_section  # noqa: E402

from llmdrop.bench import peak_rss_bytes  # noqa: E402
from llmdrop.report import dir_bytes, human_bytes, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAL = ROOT.parent / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"


def _child(kind: str, spec: str, samples: int, seq_len: int, queue) -> None:
    from llmdrop.arch import FAMILIES
    from llmdrop.calibration import load_calibration
    from llmdrop.measure import measure
    from llmdrop.models import load_model, resolve
    from llmdrop.stream import measure_streamed

    t = time.perf_counter()
    if kind == "memory":
        model, tok = load_model(spec, progress=False)
        bos = FAMILIES.get(model.config.model_type).needs_bos
        cal = load_calibration(tok, CAL, samples, seq_len, bos=bos)
        scores = measure(model, cal, progress=False)
    else:
        from transformers import AutoConfig, AutoTokenizer

        where = resolve(spec, progress=False)
        config = AutoConfig.from_pretrained(where)
        bos = FAMILIES[config.model_type].needs_bos if config.model_type in FAMILIES else False
        tok_dir = where if (Path(where) / "tokenizer.json").exists() else resolve("smollm2-135m", progress=False)
        cal = load_calibration(AutoTokenizer.from_pretrained(tok_dir), CAL, samples, seq_len, bos=bos)
        scores = measure_streamed(where, cal, progress=False)
    queue.put({"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes(), "attn": scores.attn,
               "block": scores.block})


def run_child(kind: str, spec: str, samples: int, seq_len: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, spec, samples, seq_len, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{kind} measurement of {spec} failed (exit code {p.exitcode})")
    return q.get()


def write_8b_shaped(path: Path) -> None:
    """Random bf16 weights with Llama-3-8B's layer shapes, one safetensors shard per layer (~16 GB)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "config.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1,
                      eos_token_id=2)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    h, f, kv = 4096, 14336, 8 * 128
    weight_map = {}
    shards = [("embed", {"model.embed_tokens.weight": lambda: rand(128256, h)})]
    for i in range(32):
        p = f"model.layers.{i}."
        shards.append((f"layer{i:02d}", {
            p + "self_attn.q_proj.weight": lambda: rand(h, h), p + "self_attn.k_proj.weight": lambda: rand(kv, h),
            p + "self_attn.v_proj.weight": lambda: rand(kv, h), p + "self_attn.o_proj.weight": lambda: rand(h, h),
            p + "mlp.gate_proj.weight": lambda: rand(f, h), p + "mlp.up_proj.weight": lambda: rand(f, h),
            p + "mlp.down_proj.weight": lambda: rand(h, f),
            p + "input_layernorm.weight": lambda: torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": lambda: torch.ones(h, dtype=torch.bfloat16)}))
    shards.append(("head", {"model.norm.weight": lambda: torch.ones(h, dtype=torch.bfloat16),
                            "lm_head.weight": lambda: rand(128256, h)}))
    for n, (_, tensors) in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: make() for k, make in tensors.items()}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tmp.rename(path)


def ranks_time(spec: str, samples: int, seq_len: int, ranks: int) -> tuple[float, dict]:
    out = RESULTS / "ckpt" / f"ranks{ranks}.json"
    cmd = [sys.executable, "-m", "llmdrop", "measure", spec, "--calibration", str(CAL), "--samples", str(samples),
           "--seq-len", str(seq_len), "-q", "-o", str(out)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t, json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--only-8b", action="store_true")
    args = ap.parse_args()
    sections = []
    if not args.only_8b:
        rows = []
        for spec, samples, seq_len in (("smollm2-135m", 16, 512), ("gemma3-270m", 16, 512)):
            mem = run_child("memory", spec, samples, seq_len)
            st = run_child("stream", spec, samples, seq_len)
            diff = max(abs(a - b) for a, b in zip(mem["attn"] + mem["block"], st["attn"] + st["block"]))
            rows.append([spec, "in memory", mem["seconds"], human_bytes(mem["peak_rss"]), 1.0, ""])
            rows.append([spec, "streamed", st["seconds"], human_bytes(st["peak_rss"]),
                         st["peak_rss"] / mem["peak_rss"], f"{diff:.1e}"])
        text = header("Streamed vs in-memory measurement")
        text += ("16 chunks x 512 tokens of the shared C4 text, float32; each run in a fresh process (peak RSS of "
                 "that process: model or one layer, embeddings, hidden states). `max diff` = largest difference of "
                 "any attention or block score between the two.\n\n")
        text += table(["model", "mode", "seconds", "peak RSS", "x", "max diff"], rows, markdown=True)
        t1, s1 = ranks_time("smollm2-135m", 16, 512, 1)
        t2, s2 = ranks_time("smollm2-135m", 16, 512, 2)
        diff = max(abs(a - b) for k in ("attn", "mlp", "block") for a, b in zip(s1[k], s2[k]))
        text += ("\n\nData-parallel measurement, SmolLM2-135M, same 16 x 512 tokens: one process with 2 threads vs "
                 "`torchrun --nproc-per-node 2` (gloo) with 1 thread each. Wall time includes start-up and model "
                 "loading of every process.\n\n")
        text += table(["ranks", "seconds", "x", "max score diff vs 1 rank"],
                      [[1, t1, 1.0, ""], [2, t2, t2 / t1, f"{diff:.1e}"]], markdown=True)
        sections.append(("stream", text))
    if not args.skip_8b:
        path = RESULTS / "ckpt" / "llama3-8b-shaped"
        existed = (path / "config.json").exists()
        t = time.perf_counter()
        write_8b_shaped(path)
        written = "reused from an earlier run" if existed else f"written in {time.perf_counter() - t:.0f} s"
        size = dir_bytes(path)
        st = run_child("stream", str(path), 4, 256)
        text = header("Streaming a Llama-3-8B-shaped model")
        text += ("Random bf16 weights with Llama-3-8B's shapes (32 layers, hidden 4096, FFN 14336, 8 KV heads, "
                 f"vocab 128256), one shard per layer ({written}). Measured streamed in float32 on "
                 "4 chunks x 256 tokens (C4 text through the SmolLM2 tokenizer; ids are within the vocabulary). "
                 "Peak RSS is the whole measuring process.\n\n")
        text += table(["checkpoint", "seconds", "peak RSS", "peak RSS / checkpoint", "float32 model / RAM"],
                      [[human_bytes(size), st["seconds"], human_bytes(st["peak_rss"]), st["peak_rss"] / size,
                        f"{2 * size / 2**30:.0f} GiB / 24 GiB"]], markdown=True)
        sections.append(("stream_8b", text))
        shutil.rmtree(path, ignore_errors=True)
    for name, text in sections:
        write_section(name, text)
        print(text)


if __name__ == "__main__":
    main()
