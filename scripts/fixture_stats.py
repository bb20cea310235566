"""How the fixture reacts to plain RTN quantization, and how heavy its activation tails are.

    python scripts/fixture_stats.py --data heldout:../shared/data/corpus --out models/codequant-moe-tiny/quantization_reaction.json

Rows: full precision; W4A16, W16A4 and W4A4 with round-to-nearest (uniform INT4 per row,
per-token asymmetric INT4 activations, no rotation). W16A4 quantizes the inputs of every
decoder linear, router and expert projection and keeps the weights. Tails: per token,
max|x| / median|x| at the inputs and outputs of every residual-stream norm.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from codequant.adapters import get_adapter
from codequant.calibration.data import eval_windows, load_texts
from codequant.calibration.loading import load_model
from codequant.calibration.pipeline import quantize
from codequant.config import QuantConfig
from codequant.evaluation.perplexity import evaluate
from codequant.core.activations import ActQuantSpec, fake_quantize_activations
from codequant.core.swiglu import swiglu


def activation_only(model, bits: int = 4):
    """A copy of ``model`` whose decoder linears, routers and experts see ``bits``-bit inputs."""
    model = copy.deepcopy(model)
    adapter, spec = get_adapter(model), ActQuantSpec(bits)

    def hook(module, args):
        return (fake_quantize_activations(args[0], spec),) + tuple(args[1:])

    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        x = fake_quantize_activations(hidden_states, spec)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            h = fake_quantize_activations(swiglu(F.linear(x[tok], self.gate_up_proj[e]), self.act_fn), spec)
            out.index_add_(0, tok, F.linear(h, self.down_proj[e]) * top_k_weights[tok, slot, None])
        return out

    for layer in adapter.layers(model):
        for t in adapter.quant_targets(layer):
            if t.kind == "experts":
                t.module.forward = experts_forward.__get__(t.module)
            else:
                t.module.register_forward_pre_hook(hook)
    return model


@torch.no_grad()
def tails(model, windows: torch.Tensor) -> dict:
    adapter = get_adapter(model)
    ratios: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(module, args, out):
            for kind, t in (("input", args[0]), ("output", out)):
                a = t.detach().float().abs().reshape(-1, t.shape[-1])
                ratios.setdefault(f"{name}.{kind}", []).append(a.amax(-1) / a.median(-1).values.clamp(min=1e-12))

        return hook

    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        handles.append(adapter.input_norm(layer).register_forward_hook(record(f"layers.{i}.input_layernorm")))
        handles.append(adapter.post_attention_norm(layer).register_forward_hook(record(f"layers.{i}.post_attention_layernorm")))
    for batch in windows.split(4):
        model(batch)
    for h in handles:
        h.remove()
    out = {}
    for name, parts in ratios.items():
        r = torch.cat(parts)
        out[name] = {"mean": round(r.mean().item(), 1), "p99": round(r.quantile(0.99).item(), 1), "max": round(r.max().item(), 1)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/codequant-moe-tiny")
    ap.add_argument("--data", default="heldout:../shared/data/corpus")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("models/codequant-moe-tiny/quantization_reaction.json"))
    args = ap.parse_args()

    fp, tokenizer = load_model(args.model, torch.float32)
    windows = eval_windows(tokenizer, load_texts(args.data, args.model), args.seqlen, args.max_windows)
    calib = windows[:8]
    rows = {"full precision": evaluate(fp, windows, None, progress=False)}
    for name, abits in (("W4A16 RTN", 16), ("W4A4 RTN", 4)):
        q = quantize(copy.deepcopy(fp), QuantConfig(method="rtn", abits=abits, device="cpu"), progress=False, calibration=calib).model
        rows[name] = evaluate(q, windows, fp, progress=False)
    rows["W16A4 RTN"] = evaluate(activation_only(fp), windows, fp, progress=False)
    record = {"data": args.data, "windows": list(windows.shape), "rows": rows, "activation_tails_max_over_median": tails(fp, windows[:16])}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    fp_ppl = rows["full precision"]["perplexity"]
    print("| model | perplexity | change | KL vs FP |\n|---|---|---|---|")
    for name, r in rows.items():
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(f"| {name} | {r['perplexity']:.2f} | {100 * (r['perplexity'] / fp_ppl - 1):+.1f}% | {kl} |")
    print(json.dumps(record["activation_tails_max_over_median"], indent=1))


if __name__ == "__main__":
    main()
