"""Peak memory and time of `quantize` on real MoE shapes with random weights.

Writes a model of the real config (Qwen3-30B-A3B, Mixtral-8x7B or DeepSeek-V2-Lite; or
``qwen3_moe_small``, a Qwen3-MoE a quarter as wide for CPU runs) cut to --layers decoder layers,
with random bf16 weights, to local disk, then quantizes it in a child process (default CodeQuant
W4A4, random calibration tokens, --nsamples x --seqlen, on --device) and records seconds per
stage, peak GPU memory (torch's allocator), peak host RSS, and the time extrapolated to the full
depth (total seconds x full layers / layers). ``--no-stream`` loads the whole model first (the
path before streamed weights). Run it with PYTHONPATH pointing at the code to measure (one
checkout per side of a before/after comparison):

    PYTHONPATH=src python3 benchmarks/bench_quantize_memory.py --shape qwen3_30b_a3b --layers 4 --json out.json
    PYTHONPATH=src python3 benchmarks/bench_quantize_memory.py --device cpu --shape qwen3_moe_small --layers 8 --nsamples 8 --seqlen 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # the published configs, fields that set tensor shapes and routing
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_hidden_layers=48, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
    "mixtral_8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                         tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768),
    "deepseek_v2_lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=16,
                             num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             first_k_dense_replace=1, num_hidden_layers=27, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen3_moe_small": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=32000, hidden_size=1024, intermediate_size=3072,
                            moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                            num_hidden_layers=48, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
}


def write_model(shape: str, layers: int, path: Path) -> int:
    """A random bf16 model of ``shape`` with ``layers`` decoder layers saved at ``path``; returns the full depth."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shape])
    full = fields.pop("num_hidden_layers")
    config = AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=layers, **fields)
    if (path / "config.json").is_file():
        return full
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.dim() == 1:  # norm scales: random around 1
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.02)
    model.to("cpu").save_pretrained(path)
    fixture = Path(__file__).resolve().parents[1] / "models" / "codequant-moe-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # loading asks for a tokenizer; calibration tokens are random
        shutil.copy(fixture / name, path / name)
    return full


def child(path: str, out: str, nsamples: int, seqlen: int, vocab: int, device: str, options: dict) -> dict:
    """Quantize ``path`` into ``out`` in this process and return its report plus measured peaks."""
    import torch

    from codequant.calibration.pipeline import quantize
    from codequant.config import QuantConfig

    tokens = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    start = time.time()
    result = quantize(path, QuantConfig(device=device, nsamples=nsamples, seqlen=seqlen, **options), out, progress=False, calibration=tokens, overwrite=True)
    report = {k: v for k, v in result.report.items() if k not in ("accf_loss_per_epoch",)}
    report["wall_seconds"] = round(time.time() - start, 1)
    report["child_peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3_30b_a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--models", default="/tmp/cq-bench-models", help="where the random models are written")
    ap.add_argument("--label", default="after", help="name of the code measured (before / after)")
    ap.add_argument("--device", default="cuda", help="where layers are calibrated (cuda or cpu)")
    ap.add_argument("--method", default="codequant")
    ap.add_argument("--no-stream", action="store_true", help="load the whole model first (the in-memory path)")
    ap.add_argument("--json", required=True, help="results file (rows are appended)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the quantization may run before it is stopped and recorded as such")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    options = {"method": args.method, "stream": not args.no_stream}
    if args.child:
        out = f"{args.models}/out-{Path(args.child).name}"
        print(json.dumps(child(args.child, out, args.nsamples, args.seqlen, SHAPES[args.shape]["vocab_size"], args.device, options)))
        shutil.rmtree(out, ignore_errors=True)
        return
    path = Path(args.models) / f"{args.shape}-{args.layers}L"
    start = time.time()
    full = write_model(args.shape, args.layers, path)
    written = time.time() - start
    cmd = [sys.executable, __file__, "--shape", args.shape, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json", "-", "--child", str(path),
           "--models", args.models, "--device", args.device, "--method", args.method] + (["--no-stream"] if args.no_stream else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, -1, "", f"stopped after the --timeout of {args.timeout:g} s")
    row = {"label": args.label, "shape": args.shape, "layers": args.layers, "full_layers": full, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "device": args.device, "method": args.method, "stream": not args.no_stream,
           "model_gib_bf16": round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30, 3), "write_seconds": round(written, 1)}
    if proc.returncode:
        row["error"] = proc.stderr[-3000:]
    else:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(report)
        row["extrapolated_full_model_minutes"] = round(report["wall_seconds"] * full / args.layers / 60, 1)
    print(json.dumps(row), flush=True)
    out = Path(args.json)
    rows = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
