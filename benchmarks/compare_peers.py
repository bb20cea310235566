"""CodeQuant against AutoRound and GPTQModel on the same calibration and held-out tokens.

    python -m benchmarks compare-peers [MODEL] --out benchmarks/results/peers-fixture-cpu.json

MODEL defaults to the bundled fixture. Every row quantizes a fresh copy of the full-precision
model on the same calibration windows (C4 sample) and is scored on the same held-out windows
(the fixture's held-out documents by default): perplexity, KL(full precision || quantized) per
token, top-1 agreement, and true storage bits per quantized weight (indices, codebooks,
scales and zeros). Rows (``--rows``):

  codequant:w4a16:feedback / :nearest   CodeQuant (AOS + POG + codebooks + ACCF), weights assigned
                                        with Hessian error feedback or by nearest centroid
  codequant:w4a4:feedback / :nearest    the same with 4-bit per-token activations
  codequant:w4a16:nearest:block4        ... then block-output tuning for 4 epochs (block_tuning_epochs)
  codequant:w4a16:nearest:head          ... with the lm_head quantized too (weight-only, --quantize-head)
  codequant:w4a4:feedback:clip0.9       ... with activations clipped to 0.9 of each token's range (act_clip)
  codequant:w4a4:feedback:clipsearch    ... with each module's clip ratio searched (act_clip_search)
  codequant:w4a4:feedback:ohad          ... with an online Hadamard before every o_proj too (o_proj_hadamard)
  codequant:w4a4:feedback:router8       ... with the router's input at 8 bits (router_abits); options combine
  codequant:w4a4:nearest:agroup64       ... with one activation scale per 64 channels of a token (act_group_size)
  codequant:w4a4:nearest:vrot           ... with a per-head Hadamard between v_proj and o_proj (value_rotation, R2)
  rtn:w4a4 / gptq:w4a16 / ...           CodeQuant's own baselines (any ``method:mode``)
  autoround:w4a16                       AutoRound (pip install auto-round), group 128, symmetric, on the
                                        model with its fused experts split into nn.Linear (UnfusedExperts)
  autoround:w4a16:g16                   the same with groups of 16 columns (more bits per weight)
  gptqmodel:w4a16                       GPTQModel (pip install gptqmodel), group 128

AutoRound quantizes only nn.Linear modules, so before it runs every fused experts module
(transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) is replaced by one nn.Linear per expert
projection with the same forward, checked on two calibration windows; the routers stay in full
precision for the peers. A peer that is not installed or fails on this machine gets a row with
``"status"`` and the reason instead of numbers. The peers are not test dependencies of this project. Results are
written atomically after every row; a rerun with the same settings skips rows already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from codequant.calibration.data import calibration_windows, eval_windows, load_texts
from benchmarks.common import FIXTURE, ROOT, command_line
from codequant import QuantConfig, quantize
from codequant.calibration.loading import load_model
from codequant.evaluation.perplexity import evaluate
from codequant.utils import atomic_write_text

DEFAULT_ROWS = ["codequant:w4a16:nearest", "codequant:w4a16:feedback", "autoround:w4a16", "gptqmodel:w4a16",
                "codequant:w4a4:nearest", "codequant:w4a4:feedback", "rtn:w4a4"]
ABITS = {"w4a16": 16, "w4a4": 4}
PEER_GROUP = 128  # the peers' weight group size
FP16_BITS = 16


def decoder_weights(model) -> dict[str, torch.Tensor]:
    """The 2-D and 3-D weights inside the decoder layers (what every method quantizes), cloned."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2 and "gate.weight" not in n}


def quantized_share(before: dict[str, torch.Tensor], model) -> float:
    """Share of the decoder-layer weight elements a peer changed (1.0: it quantized all of them)."""
    after = dict(model.named_parameters())
    changed = sum(w.numel() for n, w in before.items() if n in after and not torch.equal(after[n].detach().to(w.dtype), w))
    return changed / sum(w.numel() for w in before.values())


def run_codequant(fp_model, tokenizer, calib, method: str, mode: str, assignment: str, device: str, options: dict) -> tuple[torch.nn.Module, dict]:
    """``options``: further QuantConfig options of the row (:func:`row_options`)."""
    config = QuantConfig(method=method, abits=ABITS[mode], weight_assignment=assignment, nsamples=calib.shape[0], seqlen=calib.shape[1], device=device,
                         **options)
    result = quantize(copy.deepcopy(fp_model), config, tokenizer=tokenizer, progress=False, calibration=calib)
    stages = result.report["seconds_per_stage"]
    info = {"bits_per_weight": result.report["bits_per_weight"], "quantized_share": 1.0}
    if config.act_clip_search:
        info["act_clip"] = result.report["act_clip"]
    if config.block_tuning_epochs:
        info["block_tuning_seconds"] = round(stages.get("block tuning", 0.0) + stages.get("block tuning/reference", 0.0), 1)
        info["block_tuning_loss_per_epoch"] = result.report["block_tuning_loss_per_epoch"]
    return result.model, info


class UnfusedExperts(torch.nn.Module):
    """A fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]) as one nn.Linear per
    expert projection, computing what transformers' fused forward computes."""

    def __init__(self, fused: torch.nn.Module):
        super().__init__()
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        inter = down.shape[2]
        if gate_up.dim() != 3 or gate_up.shape[1] != 2 * inter or gate_up.shape[2] != down.shape[1]:
            raise ValueError(f"not the [E, 2I, H] / [E, H, I] experts layout: {tuple(gate_up.shape)}, {tuple(down.shape)}")
        self.act_fn = fused.act_fn
        self.gate_proj, self.up_proj, self.down_proj = (torch.nn.ModuleList(_linear(w) for w in ws)
                                                        for ws in (gate_up[:, :inter], gate_up[:, inter:], down))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, (gate, up, down) in enumerate(zip(self.gate_proj, self.up_proj, self.down_proj)):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                x = hidden_states[token]
                y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    return layer


def unfuse_experts(model: torch.nn.Module) -> int:
    """Replace every fused experts module of ``model`` by :class:`UnfusedExperts`; returns how many."""
    fused = [n for n, m in model.named_modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)]
    for name in fused:
        model.set_submodule(name, UnfusedExperts(model.get_submodule(name)))
    return len(fused)


def group_int4_bits(weights: dict[str, torch.Tensor], group: int, group_bits: int) -> float:
    """Bits per weight of group-wise INT4 with ``group_bits`` per group; a row of K inputs has
    ceil(K / group) groups (the last one padded; one group when K < group)."""
    total = sum(w.numel() * (4 + group_bits * math.ceil(w.shape[-1] / group) / w.shape[-1]) for w in weights.values())
    return total / sum(w.numel() for w in weights.values())


def run_autoround(fp_model, tokenizer, calib, iters: int, group: int) -> tuple[torch.nn.Module, dict]:
    from auto_round import AutoRound

    model = copy.deepcopy(fp_model)
    unfused = unfuse_experts(model)
    with torch.no_grad():
        diff = (model(calib[:2]).logits - fp_model(calib[:2]).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the unfused experts change the logits by up to {diff:.2e}")
    before = decoder_weights(model)
    texts = [tokenizer.decode(row) for row in calib]
    ar = AutoRound(model, tokenizer, bits=4, group_size=group, sym=True, iters=iters, nsamples=calib.shape[0], seqlen=calib.shape[1], dataset=texts, device_map="cpu")
    model, _ = ar.quantize()
    after = dict(model.named_parameters())
    changed = {n: w for n, w in before.items() if not torch.equal(after[n].detach().to(w.dtype), w)}
    # symmetric INT4: 4-bit codes + one fp16 scale per group, over the weights it changed
    return model, {"bits_per_weight": round(group_int4_bits(changed, group, FP16_BITS), 4), "group_size": group,
                   "quantized_share": round(quantized_share(before, model), 4), "iters": iters,
                   "unfused_experts_modules": unfused, "unfused_max_abs_logit_diff": diff}


def run_gptqmodel(fp_model, tokenizer, calib, model_path: str) -> tuple[torch.nn.Module, dict]:
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(model_path, QuantizeConfig(bits=4, group_size=PEER_GROUP, sym=True, desc_act=False), device="cpu")
    before = decoder_weights(fp_model)
    model.quantize([{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calib])
    # symmetric group-128 INT4: 4-bit codes, one fp16 scale and one 4-bit zero per group
    return model.model, {"bits_per_weight": round(4 + (FP16_BITS + 4) / PEER_GROUP, 4), "quantized_share": round(quantized_share(before, model.model), 4)}


def run_row(spec: str, fp_model, tokenizer, calib, args) -> tuple[torch.nn.Module, dict]:
    parts = spec.split(":")
    if parts[0] == "autoround":
        group = parts[2] if len(parts) > 2 else f"g{PEER_GROUP}"
        if len(parts) > 3 or not (group.startswith("g") and group[1:].isdigit() and int(group[1:]) > 0):
            raise ValueError(f"row {spec!r}: autoround rows are autoround:w4a16 or autoround:w4a16:gN (N columns per group)")
        return run_autoround(fp_model, tokenizer, calib, args.autoround_iters, int(group[1:]))
    if parts[0] == "gptqmodel":
        return run_gptqmodel(fp_model, tokenizer, calib, args.model)
    method, mode = parts[0], parts[1]
    if mode not in ABITS:
        raise ValueError(f"row {spec!r}: mode must be one of {', '.join(ABITS)}")
    return run_codequant(fp_model, tokenizer, calib, method, mode, parts[2] if len(parts) > 2 else "nearest", args.device, row_options(spec, parts[3:]))


def row_options(spec: str, parts: list[str]) -> dict:
    """The QuantConfig options of a CodeQuant row's parts after the third (see the module doc)."""
    options = {}
    for option in parts:
        if option.startswith("block") and option[5:].isdigit():
            options["block_tuning_epochs"] = int(option[5:])
        elif option == "clipsearch":
            options["act_clip_search"] = True
        elif option.startswith("clip") and _is_ratio(option[4:]):
            options["act_clip"] = float(option[4:])
        elif option.startswith("router") and option[6:].isdigit():
            options["router_abits"] = int(option[6:])
        elif option == "ohad":
            options["o_proj_hadamard"] = True
        elif option == "vrot":
            options["value_rotation"] = True
        elif option.startswith("agroup") and option[6:].isdigit():
            options["act_group_size"] = int(option[6:])
        elif option == "head":
            options["targets"] = (*QuantConfig.targets, "lm_head")
        else:
            raise ValueError(f"row {spec!r}: parts after the third must be blockN (N epochs of block-output tuning), clipR "
                             "(activation clip ratio R in (0, 1]), clipsearch, ohad, routerN (router input bits), agroupN (one activation "
                             "scale per N channels), vrot (value rotation R2) or head")
    return options


def _is_ratio(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(FIXTURE))
    p.add_argument("--out", required=True, help="results JSON (written atomically after every row)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (see the module doc)")
    p.add_argument("--calib", default=str(ROOT.parent / "shared/data/c4/c4_train_sample.jsonl"))
    p.add_argument("--data", default=f"heldout:{ROOT.parent / 'shared/data/corpus'}", help="held-out text to score on")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--autoround-iters", type=int, default=200)
    p.add_argument("--device", default="cpu", help="where CodeQuant and its baselines calibrate (the peers and the scoring run on the CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    fp_model, tokenizer = load_model(args.model, torch.float32)
    calib = calibration_windows(tokenizer, load_texts(args.calib, args.model), args.nsamples, args.seqlen, 0)
    windows = eval_windows(tokenizer, load_texts(args.data, args.model), args.seqlen, args.max_windows)
    settings = {"model": args.model, "calib": args.calib, "calibration_tokens": list(calib.shape), "data": args.data,
                "eval_tokens": list(windows.shape), "torch_threads": torch.get_num_threads(), "device": args.device}
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {}
    rows = record.get("rows", []) if record.get("settings") == settings else []
    record = {"command": command_line("compare-peers", argv), "settings": settings, "rows": rows}
    if not any(r["row"] == "full precision" for r in rows):
        fp = evaluate(fp_model, windows, progress=False)
        rows.append({"row": "full precision", "ppl": fp["perplexity"]})
    for spec in [s for s in args.rows.split(",") if s]:
        if any(r["row"] == spec for r in rows):
            continue
        start = time.time()
        try:
            model, info = run_row(spec, fp_model, tokenizer, calib, args)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            if spec.split(":")[0] not in ("autoround", "gptqmodel"):
                raise
            reason = f"{type(e).__name__}: {e}"
            rows.append({"row": spec, "status": "did not run on this machine", "reason": reason[:2000], "trace": traceback.format_exc()[-2000:]})
            print(f"{spec}: {reason}", file=sys.stderr)
        else:
            seconds = time.time() - start
            r = evaluate(model, windows, fp_model, progress=False)
            rows.append({"row": spec, "quantize_seconds": round(seconds, 1), "ppl": r["perplexity"], "kl": r["kl"], "top1": r["top1_agreement"], **info})
            del model
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")
        print(json.dumps(rows[-1]))
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    lines = ["| row | ppl | KL | top-1 | bits/weight | quantized share | quantize s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['row']} | {r['status']}: {r['reason'][:120]} | | | | | |")
            continue
        cell = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {cell('kl', '.4f')} | {cell('top1', '.3f')} | {cell('bits_per_weight', '.3f')} | {cell('quantized_share', '.2f')} | {cell('quantize_seconds', '.1f')} |")
    return "\n".join(lines)
