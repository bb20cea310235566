"""The plain PyTorch path for packed CodeQuant weights: correct everywhere, the yardstick
for every fast kernel. It dequantizes W_hat and, for W4A4, the integer activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.format import PackedWeight
from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.swiglu import swiglu


def linear(x: torch.Tensor, weight: PackedWeight, act: ActQuantSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = Q_act(x) @ W_hat^T + bias, computed in float32, returned in x's dtype."""
    return dense_linear(x, weight.dequantize(torch.float32), act, bias)


def dense_linear(x: torch.Tensor, w_hat: torch.Tensor, act: ActQuantSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` on W_hat already dequantized (float32 [N, K])."""
    x_hat = fake_quantize_activations(x.float(), act)
    return F.linear(x_hat, w_hat, None if bias is None else bias.float()).to(x.dtype)


def moe(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: PackedWeight,
    down: PackedWeight,
    act: ActQuantSpec,
    down_act: ActQuantSpec,
    hadamard_block: int = 0,
) -> torch.Tensor:
    """Routed SwiGLU experts on packed weights.

    x [T, H]; top_k_index, top_k_weights [T, k]; gate_up [E, 2I, H] (gate rows first);
    down [E, H, I]. For each token t and chosen expert e with weight p:
        h = silu(Q(x) Wg_e^T) * (Q(x) Wu_e^T);  y_t += p * Q'(h H_b) Wd_e^T
    where H_b is the online block Hadamard (hadamard_block = 0: none) whose inverse is
    already folded into Wd.
    """
    from ..core.hadamard import block_hadamard

    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"no GPU MoE kernel for activations {act} / {down_act}: the reference path it falls back to reads "
            "the routing on the host, which a CUDA graph cannot capture; run without CUDA graphs (eager, or "
            "torch.compile(mode='default')) or quantize activations per token in 4 bits (act_group_size=0)"
        )
    out = torch.zeros(x.shape[0], down.out_features, dtype=torch.float32, device=x.device)
    for e in torch.unique(top_k_index).tolist():
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        xe = x[tok]
        h = swiglu(linear(xe.float(), _expert(gate_up, e), act))
        if hadamard_block:
            h = block_hadamard(h, hadamard_block)
        y = linear(h, _expert(down, e), down_act)
        out.index_add_(0, tok, y * top_k_weights[tok, slot, None].float())
    return out.to(x.dtype)


def _expert(w: PackedWeight, e: int) -> PackedWeight:
    return PackedWeight(w.indices[e], w.codebook[e], w.row_sum[e], w.in_features)
