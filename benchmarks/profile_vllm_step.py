"""Where one decode token goes on the CPU, under vLLM and under transformers + CodeQuant, for the
same checkpoint at one request (greedy, bf16 activations):

    .venv-vllm/bin/python -m benchmarks vllm-profile CHECKPOINT [CHECKPOINT ...] --out F [--threads 1]

Each engine runs in its own child process (vLLM in-process, eager, as ``bench_vllm --vllm-in-process``
starts it; transformers inside ``decode_threads``, as ``codequant generate`` decodes). Both
generations are profiled with cProfile, one of 1 token and one of 1 + ``--tokens`` tokens; their
difference divided by ``--tokens`` is one decode token:

    step_ms        wall time per decode token (the profiled run)
    kernels_ms     time inside the project's C++ kernels (builtins of codequant.kernels.cpu._lut),
                   per entry point with its calls per token (run: one linear, moe: one MoE layer,
                   decode_layer: one whole decoder layer of the lean step)
    outside_ms     step_ms - kernels_ms: the engine's own work (modules between the kernels,
                   attention, norms, routing, scheduler, input preparation, sampler)

With checkpoints of the same shape at several depths, ``outside_ms`` against the layer count splits
the engine's cost into a part per step and a part per layer.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_vllm import RESULT, child_result, engine_env, transformers_model, vllm_engine
from benchmarks.common import command_line
from codequant.utils import atomic_write_text

KERNEL_MODULE = "codequant.kernels.cpu._lut"


def kernel_times(profile: cProfile.Profile) -> dict[str, tuple[float, int]]:
    """{entry point: (seconds, calls)} of the project's kernels in ``profile``."""
    out = {}
    for (_file, _line, name), (_cc, calls, tottime, _cum, _callers) in pstats.Stats(profile).stats.items():
        if KERNEL_MODULE in name:
            out[name.split(".")[-1].rstrip(">")] = (tottime, calls)
    return out


def per_token(short: tuple, long: tuple, tokens: int) -> dict:
    """One decode token from the profiles of a 1-token and a (1 + tokens)-token generation."""
    (t_short, k_short), (t_long, k_long) = short, long
    kernels = {}
    for name, (seconds, calls) in k_long.items():
        s0, c0 = k_short.get(name, (0.0, 0))
        kernels[name] = {"ms": round((seconds - s0) / tokens * 1e3, 3), "calls": round((calls - c0) / tokens, 2)}
    step = (t_long - t_short) / tokens * 1e3
    total = sum(k["ms"] for k in kernels.values())
    return {"step_ms": round(step, 3), "kernels_ms": round(total, 3), "outside_ms": round(step - total, 3), "kernels": kernels}


def profiled(generate) -> tuple[float, dict]:
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    generate()
    profile.disable()
    return time.perf_counter() - t0, kernel_times(profile)


def child_vllm(model: str, tokens: int, prompt: list[int]) -> dict:
    from vllm import SamplingParams

    llm = vllm_engine(model, len(prompt) + tokens + 8, 1)

    def run(n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        return lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)

    run(1 + tokens)()  # warm-up
    return per_token(profiled(run(1)), profiled(run(1 + tokens)), tokens)


def child_transformers(model: str, tokens: int, prompt: list[int], threads: int) -> dict:
    import torch

    from codequant.kernels.cpu import decode_threads

    lm = transformers_model(model, threads)
    ids = torch.tensor([prompt])

    def run(n):
        def generate():
            with torch.inference_mode(), decode_threads(threads, model=lm):
                lm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return generate

    run(1 + tokens)()  # warm-up
    return per_token(profiled(run(1)), profiled(run(1 + tokens)), tokens)


PROMPT = list(range(100, 116))  # the profiled request's prompt token ids


def profile_arguments(doc: str) -> argparse.ArgumentParser:
    """The options this profiler and ``vllm-layers`` share: checkpoints, --out, --threads, --tokens."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path, help="CodeQuant checkpoint directories (vLLM-servable)")
    ap.add_argument("--out", type=Path, help="results JSON")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens profiled")
    return ap


def profile_child(benchmark: str, checkpoint: Path, args, *options: str) -> dict:
    """The result of ``python -m benchmarks BENCHMARK CHECKPOINT --child OPTIONS`` run in an in-process
    vLLM engine's environment on ``args.threads`` threads; exits with its output when it fails."""
    command = [sys.executable, "-m", "benchmarks", benchmark, str(checkpoint), "--child", *options,
               "--threads", str(args.threads), "--tokens", str(args.tokens)]
    proc = subprocess.run(command, env=engine_env(args.threads, in_process=True), capture_output=True, text=True)
    row = child_result(proc)
    if row is None:
        sys.exit(f"{' '.join((benchmark, *options))} on {checkpoint} failed (exit status {proc.returncode}):\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")
    return row


def main(argv: list[str]) -> None:
    ap = profile_arguments(__doc__)
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--child", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model = str(args.checkpoints[0])
        row = (child_vllm(model, args.tokens, PROMPT) if args.child == "vllm"
               else child_transformers(model, args.tokens, PROMPT, args.threads))
        print(RESULT + json.dumps(row), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    report = {"command": command_line("vllm-profile", argv), "threads": args.threads, "tokens": args.tokens,
              "statistic": __doc__.split("difference")[1].split("With checkpoints")[0].strip(), "checkpoints": {}}
    for checkpoint in args.checkpoints:
        rows = report["checkpoints"][str(checkpoint)] = {}
        for engine in args.engines.split(","):
            rows[engine] = profile_child("vllm-profile", checkpoint, args, engine)
            print(checkpoint.name, engine, json.dumps(rows[engine]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
