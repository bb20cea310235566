"""The SwiGLU of the expert MLPs, one definition for every path (kernels' reference, calibration,
rotations, ACCF): an expert's gate_up = [W_g; W_u] [2I, H] holds the gate rows first, and

    h = act(x W_g^T) * (x W_u^T),   act = SiLU in every deployed kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate_up_out: torch.Tensor, act_fn=F.silu) -> torch.Tensor:
    """h = act(g) * u of an expert's gate_up output [..., 2I] = [g | u] = x [W_g; W_u]^T."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return act_fn(gate) * up
