"""The MoE router alone: transformers' router (bf16 linear, softmax, torch.topk, renormalization,
eager; the compiled one is in the profile of profile_gpu_e2e.py) against the fused CUDA router
(one launch), per call.

    PYTHONPATH=src python3 -m benchmarks gpu-router --out benchmarks/results

Router shapes of Qwen3-30B-A3B (E 128, H 2048, top-8), Mixtral-8x7B (8, 4096, top-2) and
DeepSeek-V2-Lite (64, 2048, top-6), T = 1, 4, 16 tokens; every call reads another copy of the
router weight (copies beyond the L2 cache), one CUDA graph runs them all, median over replays.
``fused_us`` is the kernel at every T (FusedRouter.max_tokens raised to the kernel's 16 tokens;
by default a fused router keeps its own forward above 4 tokens, where this benchmark found the
kernel slower). Writes gpu-router.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from benchmarks.common import copies_beyond, cuda_graph_us
from codequant.kernels.gpu import cuda_gemv
from codequant.modules.router import FusedRouter, fuse_routers

L2_BYTES = 50 * 2**20


def routers(name: str):
    from transformers import DeepseekV2Config, MixtralConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cls, config = {
        "qwen3-30b-a3b": (Qwen3MoeTopKRouter, Qwen3MoeConfig(hidden_size=2048, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
        "mixtral-8x7b": (MixtralTopKRouter, MixtralConfig(hidden_size=4096, num_local_experts=8, num_experts_per_tok=2)),
        "deepseek-v2-lite": (DeepseekV2TopkRouter, DeepseekV2Config(hidden_size=2048, n_routed_experts=64, num_experts_per_tok=6,
                                                                    topk_method="greedy", n_group=1, topk_group=1)),
    }[name]
    r = cls(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        r.weight.normal_(0, 0.02)
    n = copies_beyond(L2_BYTES, r.weight.numel() * 2)
    return [copy.deepcopy(r) for _ in range(n)]


@torch.no_grad()
def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    FusedRouter.max_tokens = cuda_gemv.ROUTE_MAX_T  # time the kernel at every batch size
    rows = []
    for name in ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"):
        rs = routers(name)
        h = rs[0].weight.shape[1]
        for t in (1, 4, 16):
            x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
            rec = {"router": name, "tokens": t, "copies": len(rs)}
            rec["transformers_eager_us"] = cuda_graph_us([lambda r=r: r(x) for r in rs])
            fused = copy.deepcopy(rs)
            for r in fused:
                fuse_routers(r)
            rec["fused_us"] = cuda_graph_us([lambda r=r: r(x) for r in fused])
            rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python -m benchmarks gpu-router " + " ".join(argv), "device": torch.cuda.get_device_name(),
            "note": "us per router call in a CUDA graph; fused_us: the CUDA router kernel at every batch size", "results": rows}
    os.makedirs(a.out, exist_ok=True)
    json.dump(meta, open(os.path.join(a.out, "gpu-router.json"), "w"), indent=1)
