"""Where one decoder layer's decode time goes under vLLM on the CPU, module by module, for a
CodeQuant checkpoint at one request (greedy, bf16 activations):

    .venv-vllm/bin/python -m benchmarks vllm-layers CHECKPOINT --out F [--threads 1]

vLLM runs in a child process, in-process and eager (as ``bench_vllm --vllm-in-process`` starts it).
Forward hooks on every module time each call; the plugin's quant methods (``apply``), the
project's C++ kernels (``_lut.run``, ``_lut.moe``, ``_lut.bf16_linear``) and the online Hadamard
are timed inside the module that calls them. As in ``vllm-profile``, a 1-token generation is
subtracted from a (1 + ``--tokens``)-token one, so each figure is per decode step:

    step_ms          wall time per decode token without hooks
    hooked_step_ms   the same with the hooks (their own cost is the difference)
    layer_us         per module of a decoder layer (names relative to the layer, the layer
                     itself as ""), the mean over layers and calls: its time with everything it
                     calls (us, hooks of its submodules included), the part of it in the plugin's
                     apply(), in the kernels and in the Hadamard, and its calls per decode token
                     (the plugin's own Python around the kernels: apply - kernels - hadamard)
    model_us         the same for the modules outside the decoder layers
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time

from benchmarks.bench_vllm import RESULT, vllm_engine
from benchmarks.common import command_line
from benchmarks.profile_vllm_step import PROMPT, profile_arguments, profile_child
from codequant.utils import atomic_write_text

TIMED_KERNELS = ("run", "moe", "bf16_linear")


class Timings:
    """Per-module times while ``on``: inclusive, the kernels' and the Hadamard's (ns), and calls."""

    def __init__(self):
        self.on, self.stack = False, []
        self.total, self.plugin, self.kernels, self.hadamard, self.calls = (collections.Counter() for _ in range(5))

    def current(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def timed(self, fn, into: collections.Counter):
        def call(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter_ns()
            out = fn(*args, **kwargs)
            into[self.current()] += time.perf_counter_ns() - t0
            return out
        return call

    def snapshot(self) -> tuple:
        return tuple(c.copy() for c in (self.total, self.plugin, self.kernels, self.hadamard, self.calls))


class TimedLut:
    """The kernels' extension module with its entry points timed into ``timings.kernels``."""

    def __init__(self, lut, timings: Timings):
        self._lut, self._timed = lut, {name: timings.timed(getattr(lut, name), timings.kernels) for name in TIMED_KERNELS}

    def __getattr__(self, name):
        return self._timed.get(name) or getattr(self._lut, name)


def child(model: str, tokens: int, prompt: list[int]) -> dict:
    import codequant.core.hadamard as hadamard
    import codequant.kernels.cpu as cpu_kernels
    from codequant.vllm import method
    from vllm import SamplingParams

    llm = vllm_engine(model, len(prompt) + tokens + 8, 1)
    net = llm.apply_model(lambda m: m)[0]  # in-process: the model itself
    layers = len(net.model.layers)

    def generate(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - t0

    generate(1 + tokens)  # warm-up
    step = (generate(1 + tokens) - generate(1)) / tokens * 1e3

    timings = Timings()
    names = {id(m): re.sub(r"^model\.layers\.\d+\.?", "layer.", name).rstrip(".") or "model forward" for name, m in net.named_modules()}

    def enter(module, *_):
        if timings.on:
            timings.stack.append((names[id(module)], time.perf_counter_ns()))

    def leave(module, *_):
        if timings.on and timings.stack:
            name, t0 = timings.stack.pop()
            timings.total[name] += time.perf_counter_ns() - t0
            timings.calls[name] += 1

    for module in net.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    cpu_kernels._lut = TimedLut(cpu_kernels._lut, timings)
    hadamard.block_hadamard = timings.timed(hadamard.block_hadamard, timings.hadamard)
    for cls in (method.CodeQuantLinearMethod, method.CodeQuantMoEMethod):
        cls.apply = timings.timed(cls.apply, timings.plugin)

    def measured(n: int) -> tuple[float, tuple]:
        timings.on = True
        seconds = generate(n)
        timings.on = False
        return seconds, timings.snapshot()

    (t_short, short), (t_long, long) = measured(1), measured(1 + tokens)
    layer_rows, model_rows = {}, {}
    for name in long[0]:
        per_layer = name.startswith("layer.") or name == "layer"
        total, plugin, kernel, had, calls = (new[name] - old.get(name, 0) for new, old in zip(long, short))
        if calls <= 0:  # called at prefill only
            continue
        rows = layer_rows if per_layer else model_rows
        rows[name.removeprefix("layer").removeprefix(".")] = {
            "us": round(total / calls / 1e3, 1), "plugin_us": round(plugin / calls / 1e3, 1), "kernels_us": round(kernel / calls / 1e3, 1),
            "hadamard_us": round(had / calls / 1e3, 1), "calls": round(calls / tokens / (layers if per_layer else 1), 2)}
    return {"layers": layers, "step_ms": round(step, 3), "hooked_step_ms": round((t_long - t_short) / tokens * 1e3, 3),
            "layer_us": dict(sorted(layer_rows.items())), "model_us": dict(sorted(model_rows.items()))}


def main(argv: list[str]) -> None:
    ap = profile_arguments(__doc__)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(child(str(args.checkpoints[0]), args.tokens, PROMPT)), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    report = {"command": command_line("vllm-layers", argv), "threads": args.threads, "tokens": args.tokens,
              "statistic": __doc__.split("so each figure is per decode step:")[1].strip(), "checkpoints": {}}
    for checkpoint in args.checkpoints:
        row = report["checkpoints"][str(checkpoint)] = profile_child("vllm-layers", checkpoint, args)
        print(checkpoint.name, json.dumps(row, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
