"""End-to-end CPU decode speed: a Qwen3-MoE model with CodeQuant-packed attention and experts
(running on the CPU LUT kernels) against the same model in bf16.

    python benchmarks/bench_cpu_e2e.py --model models/codequant-moe-tiny --out benchmarks/results/e2e-cpu-<name>.json

``--model``: the bundled fixture (or any Qwen3-MoE checkpoint); its attention projections
and routed experts are quantized data-free with CodeQuant's k-means codebooks (4-bit, one
16-entry codebook per row); embeddings, norms, routers and lm_head stay bf16.
``--random-layers L``: instead, a random-weight Qwen3-30B-A3B-shaped model with L layers
(hidden 2048, 128 experts of 768, top-8) and random packed weights, where the weight
bytes, not Python overhead, dominate a decode step.
Greedy decoding of ``--new-tokens`` tokens after a short prompt, with the KV cache; tokens/s
(median of 5 generations) for each thread count of ``--threads``, each block started on an
idle machine (see bench_cpu.wait_until_idle).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from codequant.format import PackedWeight, pack, padded_columns
from codequant.kernels import select_backend
from codequant.modules.experts import CodeQuantExperts
from codequant.modules.linear import CodeQuantLinear
from codequant.quantizers.activations import ActQuantSpec
from codequant.quantizers.codebook import fit_codebooks


def _packed(weight: torch.Tensor, random: bool) -> PackedWeight:
    if random:  # speed only: random index bytes and codebooks (row sums unused by W4A16 and recomputed for W4A4/W4A8)
        *lead, n, k = weight.shape
        gen = torch.Generator().manual_seed(n * 31 + k)
        idx = torch.randint(0, 256, (*lead, n, padded_columns(k) // 2), dtype=torch.uint8, generator=gen)
        codebook = (0.02 * torch.randn(*lead, n, 1, 16, generator=gen)).half()
        return PackedWeight(idx, codebook, torch.zeros(*lead, n), k)
    idx, codebook = fit_codebooks(weight.float(), bits=4, group_size=weight.shape[-1])
    return pack(idx, codebook)


def codequant_model(model: nn.Module, act: ActQuantSpec, random: bool) -> nn.Module:
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            q = CodeQuantLinear.from_packed(_packed(lin.weight.data, random), None if lin.bias is None else lin.bias.data, act=act)
            setattr(attn, name, q)
        experts = layer.mlp.experts
        gate_up, down = _packed(experts.gate_up_proj.data, random), _packed(experts.down_proj.data, random)
        layer.mlp.experts = CodeQuantExperts.from_packed(gate_up, down, act)
    return model


def random_model(layers: int) -> nn.Module:
    cfg = Qwen3MoeConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, threads: int, repeats: int = 5) -> tuple[float, float]:
    """(median, best) decode tokens/s over `repeats` generations (after a warm-up)."""
    torch.set_num_threads(threads)
    rates = []
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
            assert out.shape[1] == prompt.shape[1] + new_tokens
            rates.append(new_tokens / dt)
    return statistics.median(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/codequant-moe-tiny")
    ap.add_argument("--random-layers", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    random = args.random_layers > 0
    if random:
        base = random_model(args.random_layers)
        source = f"random-weight Qwen3-30B-A3B-shaped model, {args.random_layers} layers"
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        source = args.model
    base.generation_config.pad_token_id = base.generation_config.eos_token_id = None
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    variants = {"bf16": base}
    for name, act in (("codequant-w4a16", ActQuantSpec(16)), ("codequant-w4a8", ActQuantSpec(8)), ("codequant-w4a4", ActQuantSpec(4))):
        variants[name] = codequant_model(base, act, random)
    assert select_backend("moe", "cpu").__module__ == "codequant.kernels.cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cpu import wait_until_idle

    results, idle_log = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        wait_until_idle(idle_log)
        row = {"threads": threads}
        best = {}
        for name, model in variants.items():
            med, top = decode_tokens_per_s(model, prompt, args.new_tokens, threads)
            row[name], best[name] = round(med, 2), round(top, 2)
        for name in variants:
            if name != "bf16":
                row[f"{name}_vs_bf16"] = round(row[name] / row["bf16"], 3)
        row["best"] = best
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {
        "model": source,
        "unit": "decode tokens/s (greedy, KV cache, batch 1)",
        "new_tokens": args.new_tokens,
        "quantized": "attention q/k/v/o and routed experts: 4-bit indices, one 16-entry codebook per row; rest bf16",
        "loadavg": os.getloadavg(),
        "idle_checks": idle_log,
        "statistic": "median of 5 generations after a warm-up (best of the 5 under 'best')",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
