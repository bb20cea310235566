"""Text generation from a CodeQuant checkpoint (or any causal LM), streamed, with tokens per second."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)


def compile_config():
    """transformers ``CompileConfig`` for a CodeQuant decode step: fullgraph, Inductor with CUDA
    graphs (mode "reduce-overhead"), on every device (transformers alone compiles only on GPUs)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    return config


def _one_pool(model, compiled: bool):
    """On the CPU, :func:`codequant.kernels.cpu.decode_threads` (the whole thread budget to the
    kernels, torch's ops on 1 thread; eager, the bf16 lm_head on the kernels' threads too);
    elsewhere, or without the CPU kernels, nothing."""
    if next(model.parameters()).device.type == "cpu":
        try:
            from .kernels.cpu import decode_threads
        except ImportError:
            pass
        else:
            return decode_threads(model=None if compiled else model)
    return contextlib.nullcontext()


def generate(
    model_dir_or_model,
    prompt: str,
    max_new_tokens: int = 64,
    stream: bool = True,
    *,
    tokenizer=None,
    device: str | None = None,
    do_sample: bool = False,
    compile=False,
    **generate_kwargs,
) -> tuple[str, float]:
    """Generate a continuation of ``prompt``; returns (new text, new tokens per second).

    ``model_dir_or_model`` is a checkpoint directory (loaded with ``from_pretrained``; its
    tokenizer too) or a loaded model (then pass ``tokenizer``, or the model's
    ``config.name_or_path`` must hold one). With ``stream`` the new text is printed to stdout
    as it is produced (``TextStreamer``). Greedy by default; the KV cache is used. The rate
    counts every new token over the whole ``generate`` call (prefill included). On the CPU the
    call runs inside :func:`codequant.kernels.cpu.decode_threads` (eager: with the bf16 lm_head
    on the kernels' threads; torch's thread count is restored after it).

    ``compile`` (True or a transformers ``CompileConfig``): a static KV cache and the decode step
    under ``torch.compile`` (transformers' generation compile, CUDA graphs on a GPU: about 2x the
    decode rate of a 30B MoE on an H200, benchmarks/README.md); the first call pays for it.
    Inductor rounds a fused chain of bf16 ops once, where eager rounds after each op, so a W4A4
    model's activation codes can flip at rounding ties and the text can differ from eager;
    ``torch._inductor.config.emulate_precision_casts = True`` makes them equal.
    """
    import codequant  # noqa: F401  registers the CodeQuant quantizer with transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .io.checkpoint import refuse_packed_without_config

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        path = os.fspath(model_dir_or_model)
        refuse_packed_without_config(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            source = getattr(model.config, "name_or_path", None)
            if not source:
                raise ValueError("pass tokenizer= with a model object that was not loaded from a directory")
            tokenizer = AutoTokenizer.from_pretrained(source)
    if device is not None:
        model = model.to(device)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    if compile:
        config = compile_config() if compile is True else compile
        config._compile_all_devices = True
        generate_kwargs = {"cache_implementation": "static", "compile_config": config, **generate_kwargs}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.no_grad(), _one_pool(model, bool(compile)):
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True, streamer=streamer,
            pad_token_id=pad, **generate_kwargs,
        )
    elapsed = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    rate = len(new) / elapsed if elapsed > 0 else float("inf")
    logger.debug("generated %d tokens in %.2f s (%.1f tokens/s)", len(new), elapsed, rate)
    return tokenizer.decode(new, skip_special_tokens=True), rate
