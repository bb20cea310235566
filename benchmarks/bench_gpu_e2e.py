"""End-to-end decode speed of a full-size Qwen3-30B-A3B-shaped model: bf16 vs CodeQuant.

    PYTHONPATH=src python3 -m benchmarks gpu-e2e --out benchmarks/results

The model is transformers' Qwen3MoeForCausalLM of the published config (benchmarks.common.SHAPES:
hidden 2048, 48 layers, 128 experts top-8, expert width 768, 32 heads / 4 KV heads,
head_dim 128, vocab 151936), bf16, initialized on the GPU. The bf16 experts run through
transformers' ``grouped_mm`` experts implementation. The CodeQuant model replaces (through the
architecture adapter) every attention linear by CodeQuantLinear and every experts module by CodeQuantExperts with
RANDOM packed indices and codebooks (speed does not depend on the values); routers, norms,
embeddings and lm_head stay bf16; the CodeQuant model's routers run fused (``fuse_routers``: the
CUDA router kernel, one launch per layer), with ``--routers both`` first as transformers' own
(``transformers``: only so), and its q/k/v projections as one linear (``fuse_qkv``: one launch
per layer), with ``--qkv both`` first as three (``separate``: only so). Greedy decode of --new tokens after a --prompt token
prompt, batch 1, timed without and with CUDA graphs (StaticCache, one decode step per
graph replay), and with CUDA graphs of the model with every decoder layer under
``torch.compile`` (Inductor fuses the norms, RoPE, router and residual code around the
``codequant::linear`` / ``codequant::moe`` / ``codequant::route`` ops; one compile per layer index, because
transformers' static cache specializes on it; the compile time is printed, not timed);
``--compiled-only``: only the last. The W4A4 model has the online Hadamard before the experts' down
projections (block 256) as ``codequant quantize`` makes it; ``--o-proj-hadamard``: a third model, W4A4
with the Hadamard before every o_proj too (block 4096, ``codequant quantize --o-proj-hadamard``);
the CUDA kernels' prologue applies these Hadamards (``--prologue-hadamard off``: block_hadamard
before it, ``both``: each W4A4 model both ways in turn). The W4A16 and the W4A4 model run in each of the chosen
router and q/k/v settings (all the separate q/k/v ones first: fusing is not undone); ``vs_bf16``
is each rate over the bf16 model's in the same mode. Writes gpu-e2e.json (the command line in it)
after every model.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import QWEN3_30B_A3B, cuda_graph, install_codequant, model_config, random_model, random_packed_on, set_online_hadamard
from codequant.adapters import get_adapter
from codequant.core.activations import ActQuantSpec
from codequant.kernels import kernel_options
from codequant.modules.attention import fuse_qkv
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.modules.router import FusedRouter, fuse_routers
from codequant.utils import atomic_write_text


def gpu_model(layers: int):
    """The bf16 Qwen3-30B-A3B-shaped model on the GPU, its bf16 experts on transformers' grouped_mm."""
    config = model_config(QWEN3_30B_A3B, layers)
    config._experts_implementation = "grouped_mm"
    return random_model(config, "cuda")


def quantize_randomly(model, act: ActQuantSpec):
    """Swap attention linears and experts for CodeQuant modules with random packed weights."""
    install_codequant(model, act, random_packed_on("cuda"))
    torch.cuda.empty_cache()


def set_act(model, act: ActQuantSpec):
    for m in model.modules():
        if isinstance(m, CodeQuantLinear):
            m.act = act
        elif isinstance(m, CodeQuantExperts):
            m.act = m.down_act = act


@torch.no_grad()
def decode_eager(model, prompt, new_tokens):
    out = model(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    toks = []
    for _ in range(new_tokens):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0), torch.cat(toks, 1)


@torch.no_grad()
def decode_graph(model, prompt, new_tokens, compiled: bool = False):
    """Greedy decode, one CUDA-graph replay per token; ``compiled``: the decoder layers under
    torch.compile from the first decode step on (the prompt runs eagerly)."""
    from transformers import StaticCache

    p = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + new_tokens + 8)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device=prompt.device), use_cache=True)
    tok_buf = out.logits[:, -1:].argmax(-1).clone()
    pos_buf = torch.tensor([p], device=prompt.device)
    if compiled:
        compile_layers(model, True)

    def step():
        return model(input_ids=tok_buf, past_key_values=cache, cache_position=pos_buf, use_cache=True).logits

    g, logits_buf = cuda_graph(step)  # the warm-up steps write cache slot p, rewritten by the timed steps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    toks = []
    for _ in range(new_tokens):
        g.replay()
        nxt = logits_buf[:, -1:].argmax(-1)
        tok_buf.copy_(nxt)
        pos_buf.add_(1)
        toks.append(nxt)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0), torch.cat(toks, 1)


def unfuse_routers(model) -> int:
    """Undo fuse_routers: every FusedRouter back to its router class (the number turned)."""
    n = 0
    for m in model.modules():
        if isinstance(m, FusedRouter):
            m.__class__ = type(m).__bases__[1]  # _fused_router_class: (FusedRouter, router class)
            n += 1
    return n


def compile_layers(model, on: bool):
    """torch.compile every decoder layer for static shapes, or undo it."""
    import torch._dynamo

    torch._dynamo.reset()
    layers = get_adapter(model).layers(model)
    torch._dynamo.config.recompile_limit = 2 * len(layers)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for layer in layers:
        if on:
            layer.compile(dynamic=False)
        else:
            layer._compiled_call_impl = None


def run_all(model, prompt, new_tokens, label, results, compiled: bool, compiled_only: bool = False):
    from torch._dynamo.utils import counters

    rec = {"model": label}
    if not compiled_only:
        tps, _ = decode_eager(model, prompt, new_tokens)
        rec["tokens_per_s_eager"] = round(tps, 2)
        print(f"{label}: eager {tps:.1f} tok/s", flush=True)
    modes = [] if compiled_only else [("cuda_graph", False)]
    for key, comp in modes + ([("compiled_cuda_graph", True)] if compiled else []):
        try:
            t0 = time.time()
            counters.clear()
            tps_g, _ = decode_graph(model, prompt, new_tokens, comp)
            rec[f"tokens_per_s_{key}"] = round(tps_g, 2)
            if comp:
                rec["graph_breaks"] = sum(counters["graph_break"].values())
            print(f"{label}: {key} {tps_g:.1f} tok/s ({time.time() - t0:.0f} s with warm-up)", flush=True)
        except Exception as e:  # noqa: BLE001
            rec[f"tokens_per_s_{key}"] = None
            rec[f"{key}_error"] = repr(e)[:300]
            print(f"{label}: {key} failed: {e!r}"[:400], flush=True)
            torch.cuda.synchronize()
        finally:
            if comp:
                compile_layers(model, False)
    results.append(rec)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--compiled-only", action="store_true", help="only the compiled CUDA-graph decode")
    ap.add_argument("--routers", choices=["fused", "transformers", "both"], default="fused",
                    help="the CodeQuant model's routers: fused (CUDA router kernel), transformers' own, or both in turn")
    ap.add_argument("--qkv", choices=["fused", "separate", "both"], default="fused",
                    help="the CodeQuant model's q/k/v projections: one linear (fuse_qkv), three, or both in turn")
    ap.add_argument("--o-proj-hadamard", action="store_true",
                    help="also W4A4 with the online Hadamard before every o_proj (block: its whole input width)")
    ap.add_argument("--prologue-hadamard", choices=["on", "off", "both"], default="on",
                    help="W4A4: the online Hadamard in the CUDA prologue, as block_hadamard before it, or both in turn")
    a = ap.parse_args(argv)
    if a.no_compile and a.compiled_only:
        ap.error("--no-compile and --compiled-only exclude each other")
    t0 = time.time()
    model = gpu_model(a.layers)
    print(f"built in {time.time() - t0:.0f} s; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params", flush=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt), device="cuda")
    results = []
    compiled, only = not a.no_compile, a.compiled_only
    meta = {"command": "python -m benchmarks gpu-e2e " + " ".join(argv), "layers": a.layers, "prompt": a.prompt,
            "new_tokens": a.new, "batch": 1, "device": torch.cuda.get_device_name(),
            "note": "random packed weights (speed does not depend on values); routers (bf16 weights), norms, embeddings, lm_head bf16",
            "results": results}
    os.makedirs(a.out, exist_ok=True)

    def run(label):  # gpu-e2e.json rewritten after every model, so a run cut short keeps what it measured
        run_all(model, prompt, a.new, label, results, compiled, only)
        rec, base = results[-1], results[0]
        for key, tps in list(rec.items()):
            if key.startswith("tokens_per_s") and tps and base.get(key):
                rec["vs_bf16" + key.removeprefix("tokens_per_s")] = round(tps / base[key], 3)
        atomic_write_text(os.path.join(a.out, "gpu-e2e.json"), json.dumps(meta, indent=1))

    run("bf16 (transformers grouped_mm experts)")
    quantize_randomly(model, ActQuantSpec(bits=16))
    print(f"quantized; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    both = [False, True]
    for qkv in {"separate": [False], "fused": [True], "both": both}[a.qkv]:
        if qkv:
            print(f"fused q/k/v: {fuse_qkv(model)}", flush=True)
        modes = [("W4A16", 16, False), ("W4A4", 4, False)] + ([("W4A4 + o_proj Hadamard", 4, True)] if a.o_proj_hadamard else [])
        for mode, bits, o_hadamard in modes:
            set_act(model, ActQuantSpec(bits=bits))
            set_online_hadamard(model, down=bits < 16, o_proj=o_hadamard)
            for routers in {"transformers": [False], "fused": [True], "both": both}[a.routers]:
                if turned := fuse_routers(model) if routers else unfuse_routers(model):
                    print(f"{'fused' if routers else 'transformers'} routers: {turned}", flush=True)
                for in_prologue in {"on": [True], "off": [False], "both": both[::-1]}[a.prologue_hadamard] if bits < 16 else [True]:
                    with kernel_options(cuda_prologue_hadamard=in_prologue):
                        run(f"CodeQuant {mode} (attention + experts), {'fused' if routers else 'transformers'} routers, "
                            f"q/k/v {'fused' if qkv else 'separate'}" + ("" if in_prologue else ", Hadamard before the prologue"))
    print(json.dumps(results, indent=1))
