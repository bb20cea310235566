"""vLLM serving speed on the CPU: CodeQuant W4A16 and W4A4 against the same model in bf16, side by side,
and transformers + CodeQuant end to end on the same checkpoints.

    .venv-vllm/bin/python -m benchmarks vllm --out benchmarks/results/vllm-cpu-zen4-2c.json

Models: the bundled fixture (models/codequant-moe-tiny) and a Qwen3-30B-A3B-shaped model cut to
``--layers`` decoder layers (the published config, random bf16 weights; written once under
``--work`` by benchmarks.common.write_random_model). The CodeQuant checkpoints are made data-free
(tests/vllm_serving/checkpoints.py: min-max grids of 16 centroids, one codebook per row, online
Hadamard blocks, activations quantized as ``codequant quantize`` does by default (W4A4: 4 bits, one
scale per token, no clipping), quantized attention, routers and routed experts; embeddings, norms and lm_head
stay bf16, except that the ``-head`` variants pack the lm_head too, weight-only, as ``codequant
quantize --quantize-head`` does): speed depends on the packed format, not on how the centroids were found.

Every engine runs in its own child process, one at a time, with ``--threads`` OpenMP threads
(vLLM: VLLM_CPU_OMP_THREADS_BIND=0-(threads-1), else vLLM reserves a core of two for its
scheduler; transformers: torch.set_num_threads) and OMP_WAIT_POLICY=PASSIVE. For each
concurrency c, c requests of ``--prompt-len`` random token ids are submitted at once
(``LLM.generate`` with all c; ``generate`` with a batch of c for transformers, inside
``codequant.kernels.cpu.decode_threads`` as ``codequant generate`` runs it), greedy with EOS
ignored: ``latency_s`` is the time until all c requests have ``--new-tokens`` tokens (every
request's latency, as they run together), ``ttft_s`` the same with 1 new token, ``tokens_per_s``
c * new_tokens / latency_s, and ``decode_tokens_per_s`` c * (new_tokens - 1) / (latency_s - ttft_s)
(tokens/s after the prefill, all requests together). Medians of ``--repeats`` after a warm-up; with
``--rounds R`` every engine is started R times, the variants interleaved (round 1 of each, then
round 2, ...), and each row is the median over rounds (this machine's memory bandwidth drifts by
20% or more between minutes, so one start per variant can put bf16 and CodeQuant in different weather).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ACT_BITS, FIXTURE, command_line, write_random_model

# name: (activation bits, packed lm_head) of the CodeQuant checkpoints; bf16: the source model
VARIANTS = {"bf16": None, **{f"codequant-{mode}{'-head' * head}": (ACT_BITS[mode], head) for head in (False, True) for mode in ("w4a16", "w4a4")}}


def prompts(concurrency: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(concurrency)
    return torch.randint(0, vocab, (concurrency, length), generator=g).tolist()


def summarize(concurrency: int, new_tokens: int, full: list[float], first: list[float]) -> dict:
    latency, ttft = statistics.median(full), statistics.median(first)
    return {
        "concurrency": concurrency,
        "latency_s": round(latency, 4),
        "ttft_s": round(ttft, 4),
        "tokens_per_s": round(concurrency * new_tokens / latency, 2),
        "decode_tokens_per_s": round(concurrency * (new_tokens - 1) / (latency - ttft), 2),
        "latency_runs_s": [round(t, 4) for t in full],
    }


def engine_env(threads: int, in_process: bool) -> dict[str, str]:
    """The environment an engine's child runs in (see the module doc)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", OMP_NUM_THREADS=str(threads))
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def vllm_engine(model: str, max_model_len: int, max_num_seqs: int):
    """vLLM's offline engine as the benchmarks run it: bf16, eager, prompts as token ids."""
    from vllm import LLM

    return LLM(model, dtype="bfloat16", enforce_eager=True, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=0,
               skip_tokenizer_init=True)


def transformers_model(model: str, threads: int):
    """The checkpoint under transformers in bf16 on ``threads`` torch threads, generating without EOS or padding."""
    import torch
    from transformers import AutoModelForCausalLM

    import codequant  # noqa: F401  (registers the checkpoint format)

    torch.set_num_threads(threads)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    lm.generation_config.pad_token_id = lm.generation_config.eos_token_id = None
    return lm


def child_vllm(args) -> list[dict]:
    from vllm import SamplingParams

    llm = vllm_engine(args.model, args.prompt_len + args.new_tokens + 8, max(args.concurrency))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    full_params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    first_params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)

    def timed(batch, params, tokens):
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
        return dt

    rows = []
    for c in args.concurrency:
        batch = prompts(c, args.prompt_len, vocab)
        timed(batch, full_params, args.new_tokens)  # warm-up
        full = [timed(batch, full_params, args.new_tokens) for _ in range(args.repeats)]
        first = [timed(batch, first_params, 1) for _ in range(args.repeats)]
        rows.append(summarize(c, args.new_tokens, full, first))
    return rows


def child_transformers(args) -> list[dict]:
    import torch

    from codequant.kernels.cpu import decode_threads

    model = transformers_model(args.model, args.threads)

    def timed(batch, tokens):
        t0 = time.perf_counter()
        with torch.inference_mode(), decode_threads(args.threads, model=model):  # as `codequant generate` decodes
            out = model.generate(batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
        assert out.shape[1] == batch.shape[1] + tokens
        return dt

    rows = []
    for c in args.concurrency:
        batch = torch.tensor(prompts(c, args.prompt_len, model.config.vocab_size))
        timed(batch, args.new_tokens)  # warm-up
        full = [timed(batch, args.new_tokens) for _ in range(args.repeats)]
        first = [timed(batch, 1) for _ in range(args.repeats)]
        rows.append(summarize(c, args.new_tokens, full, first))
    return rows


def make_checkpoints(work: Path, layers: int, models: list[str], variants: list[str]) -> dict[str, dict[str, Path]]:
    """{model: {variant: checkpoint dir}} for bf16 and ``variants``; written once under ``work``."""
    import torch

    from codequant import QuantConfig
    from codequant.core.activations import ActQuantSpec
    from tests.vllm_serving.checkpoints import make_checkpoint  # the serving tests' checkpoint writer

    dirs = {}
    for name in models:
        if name == "fixture":
            source = FIXTURE
        else:
            source = work / f"{name}-{layers}l-bf16"
            write_random_model(name, layers, source)
        dirs[name] = {"bf16": source}
        for variant in variants:
            act_bits, lm_head = VARIANTS[variant]
            out = work / f"{name}-{layers}l-{variant}" if name != "fixture" else work / f"fixture-{variant}"
            if not (out / "config.json").is_file():
                print(f"writing {out}", flush=True)
                act = ActQuantSpec(act_bits, QuantConfig.act_group_size, QuantConfig.act_clip)  # codequant quantize's default
                make_checkpoint(out, act_bits, source=source, group_size=None, dtype=torch.bfloat16, lm_head=lm_head, act=act)
            dirs[name][variant] = out
    return dirs


RESULT = "RESULT "  # a benchmark child prints its result as one line: RESULT <json>


def child_result(proc: subprocess.CompletedProcess):
    """The JSON of a finished child's last RESULT line, or None when it failed or printed none."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1].removeprefix(RESULT)) if lines and not proc.returncode else None


def run_child(engine: str, model: Path, args) -> dict:
    env = engine_env(args.threads, args.vllm_in_process)
    command = [sys.executable, "-m", "benchmarks", "vllm", "--child", engine, "--model", str(model), "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats),
               "--concurrency", ",".join(map(str, args.concurrency))]
    t0 = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    rows = child_result(proc)
    if rows is None:
        return {"error": f"exit status {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:], "wall_s": round(time.time() - t0, 1)}
    return {"rows": rows, "wall_s": round(time.time() - t0, 1), "loadavg_after": os.getloadavg()}


def median_rows(runs: list[dict]) -> list[dict]:
    """Per concurrency, the median over rounds of each rate and time (rounds that failed are left out)."""
    done = [run["rows"] for run in runs if "rows" in run]
    if not done:
        return []
    keys = ("latency_s", "ttft_s", "tokens_per_s", "decode_tokens_per_s")
    return [{"concurrency": rows[0]["concurrency"], **{k: round(statistics.median(r[k] for r in rows), 4) for k in keys},
             "rounds": len(rows)} for rows in zip(*done)]


def ratios(results: dict) -> dict:
    """CodeQuant / bf16 under vLLM, and vLLM / transformers for the same checkpoint, per concurrency."""
    out = {}
    vllm, hf = results["vllm"], results["transformers"]
    for variant in VARIANTS:
        for i, row in enumerate(vllm.get(variant, {}).get("rows", [])):
            c = row["concurrency"]
            base = vllm.get("bf16", {}).get("rows")
            if variant != "bf16" and base:
                for key in ("decode_tokens_per_s", "tokens_per_s"):
                    out[f"vllm {variant} / vllm bf16, {key}, c={c}"] = round(row[key] / base[i][key], 3)
            other = hf.get(variant, {}).get("rows")
            if other:
                out[f"vllm {variant} / transformers {variant}, tokens_per_s, c={c}"] = round(row["tokens_per_s"] / other[i]["tokens_per_s"], 3)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="results JSON")
    ap.add_argument("--models", default="fixture,qwen3_30b_a3b", help="fixture and/or a shape of benchmarks.common.SHAPES")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the shaped model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cq-bench-vllm"), help="where the checkpoints are written")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="start every engine this many times, variants interleaved; rows are medians over rounds")
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--vllm-in-process", action="store_true",
                    help="VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's engine core in the LLM's own process (default: its own process)")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "bf16"),
                    help=f"CodeQuant checkpoints beside bf16: {', '.join(v for v in VARIANTS if v != 'bf16')} (-head: lm_head packed too)")
    ap.add_argument("--contended", action="store_true", help="record that other work shared the CPUs during the run")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one engine's child may run")
    ap.add_argument("--child", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    if args.child:
        rows = child_vllm(args) if args.child == "vllm" else child_transformers(args)
        print(RESULT + json.dumps(rows), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    models = args.models.split(",")
    engines = args.engines.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS) | ({"bf16"} & set(variants)))
    if unknown:
        ap.error(f"unknown --variants {unknown}; choose from {', '.join(v for v in VARIANTS if v != 'bf16')}")
    dirs = make_checkpoints(args.work, args.layers, models, variants)
    report = {
        "command": command_line("vllm", argv),
        "contended": args.contended,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "threads": args.threads,
        "env": {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
                **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if args.vllm_in_process else {})},
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "rounds": args.rounds,
                     "concurrency": args.concurrency, "dtype": "bfloat16 (activations, unquantized tensors)",
                     "vllm": "LLM(enforce_eager=True), greedy, ignore_eos, prompts as token ids"},
        "statistic": __doc__.split("Every engine runs")[1].strip(),
        "models": {},
    }
    for name in models:
        label = "models/codequant-moe-tiny" if name == "fixture" else f"{name} config, {args.layers} layers, random bf16 weights"
        results = {"source": label, "vllm": {}, "transformers": {}}
        for r in range(args.rounds):
            for engine in engines:
                for variant, path in dirs[name].items():
                    print(f"{name} round {r + 1} {engine} {variant} ...", flush=True)
                    run = run_child(engine, path, args)
                    results[engine].setdefault(variant, {"runs": []})["runs"].append(run)
                    print(json.dumps(run)[:600], flush=True)
        for engine in engines:
            for entry in results[engine].values():
                entry["rows"] = median_rows(entry["runs"])
        results["ratios"] = ratios(results)
        report["models"][name] = results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({n: r["ratios"] for n, r in report["models"].items()}, indent=1))
