"""Statistics collection: module inputs captured by hooks, and the input statistics of each
weight (:class:`InputStats`), per routed expert included."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.hadamard import block_hadamard
from ..core.swiglu import swiglu
from ..quantizers.weight_quantizer import WeightStats


def capture_inputs(modules: dict[str, nn.Module]):
    """Forward pre-hooks that collect each module's first input as [tokens, features] on the host."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
        for name, m in modules.items()
    ]
    return store, handles


def concat(store: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat(v) for k, v in store.items()}


def collect_inputs(modules: dict[str, nn.Module], forward) -> dict[str, torch.Tensor]:
    """Each module's inputs [tokens, features] (on the host) while ``forward()`` runs."""
    store, handles = capture_inputs(modules)
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return concat(store)


@dataclass
class InputStats:
    """a_k = E[x_k^2], b_k = E[x_k xq_k] (xq = Q_act(x)), and when asked H = 2 E[xq xq^T]."""

    a: torch.Tensor
    b: torch.Tensor
    count: int
    hessian: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def of(cls, x: torch.Tensor, act: ActQuantSpec, hessian: bool, device: torch.device | None = None, transform=None, batch: int = 8192) -> "InputStats":
        """Statistics of the rows of x [T, K] (T > 0; after ``transform``), summed over batches
        of ``batch`` rows moved to ``device`` (default: x's device)."""
        device = device or x.device
        a = b = h = None
        for s in range(0, x.shape[0], batch):
            xb = x[s : s + batch].to(device)
            xb = transform(xb) if transform is not None else xb
            if a is None:  # the transform may change the row length
                k = xb.shape[-1]
                a, b = torch.zeros(k, device=device), torch.zeros(k, device=device)
                h = torch.zeros(k, k, device=device) if hessian else None
            xq = fake_quantize_activations(xb, act)
            a += (xb * xb).sum(0)
            b += (xb * xq).sum(0)
            if hessian:
                h += xq.T @ xq
        n = max(x.shape[0], 1)
        return cls(a / n, b / n, x.shape[0], 2 * h / n if hessian else None)

    @classmethod
    def uninformed(cls, k: int, hessian: bool, device: torch.device) -> "InputStats":
        """No tokens seen: a = b = 1 (plain k-means), H = I."""
        return cls(torch.ones(k, device=device), torch.ones(k, device=device), 0, torch.eye(k, device=device) if hessian else None)

    def weight_stats(self) -> WeightStats:
        return WeightStats(self.a, self.b, self.hessian)


def stacked(stats: list[InputStats]) -> WeightStats:
    """The statistics of a stack of experts, one per expert."""
    hessian = torch.stack([s.hessian for s in stats]) if stats[0].hessian is not None else None
    return WeightStats(torch.stack([s.a for s in stats]), torch.stack([s.b for s in stats]), hessian)


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor, hadamard: int) -> torch.Tensor:
    """Expert e's down-projection input act(x G_e^T) * (x U_e^T) (times H_b with the online Hadamard)."""
    h = swiglu(F.linear(x, experts.gate_up_proj[e].float()), experts.act_fn)
    return block_hadamard(h, hadamard) if hadamard else h


def all_token_experts_stats(experts: nn.Module, x: torch.Tensor, which: list[int], act: ActQuantSpec, down_act: ActQuantSpec,
                            hadamard: int, hessian: bool, batch: int) -> list[tuple[int, InputStats, InputStats]]:
    """(e, gate_up stats, down stats) for each expert e in ``which`` over every token of x [T, H]
    (on the host; batches of ``batch`` tokens visit the experts' device), whatever the routing:
    gate_up sees x itself (one InputStats shared by all), down sees :func:`expert_hidden` of x.
    For experts the routing never reached, so their codebooks are fit to data, not data-free."""
    dev = experts.gate_up_proj.device
    shared = InputStats.of(x, act, hessian, dev, batch=batch)
    return [(e, shared, InputStats.of(x, down_act, hessian, dev, lambda v, e=e: expert_hidden(experts, e, v, hadamard), batch)) for e in which]


def routed_tokens(x: torch.Tensor, top_k_index: torch.Tensor, device: torch.device):
    """(e, the tokens of x [T, H] routed to expert e, on ``device``) for every expert some token reached."""
    for e in torch.unique(top_k_index).tolist():
        yield e, x[torch.nonzero((top_k_index == e).any(-1)).squeeze(-1)].to(device)


def experts_stats(experts: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, act: ActQuantSpec, down_act: ActQuantSpec,
                  hadamard: int, hessian: bool) -> tuple[list[InputStats], list[InputStats]]:
    """Per-expert input statistics of gate_up and down over each expert's routed tokens (x [T, H]
    and top_k_index may live on the host; each expert's tokens visit the experts' device)."""
    num, hidden, inter = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1]
    dev = experts.gate_up_proj.device
    gu = [InputStats.uninformed(hidden, hessian, dev) for _ in range(num)]
    dn = [InputStats.uninformed(inter, hessian, dev) for _ in range(num)]
    for e, xe in routed_tokens(x, top_k_index, dev):
        gu[e], dn[e] = InputStats.of(xe, act, hessian), InputStats.of(expert_hidden(experts, e, xe, hadamard), down_act, hessian)
    if hessian:
        pool_expert_hessians(gu)
        pool_expert_hessians(dn)
    return gu, dn


def pool_expert_hessians(stats: list[InputStats]) -> None:
    """Fallback for experts with few routed tokens: H_e <- (n_e H_e + K H_bar) / (n_e + K).

    H_bar = sum_e n_e H_e / sum_e n_e is the Hessian of all tokens routed in the block, and K
    (the row length) acts as a prior count: an expert with n_e << K tokens has a rank-deficient
    H_e and gets mostly H_bar; one with n_e >> K keeps its own. Unreached experts get H_bar.
    """
    total = sum(s.count for s in stats)
    if total == 0:
        return
    pooled = sum(s.hessian * s.count for s in stats if s.count) / total
    prior = pooled.shape[-1]
    for s in stats:
        s.hessian = (s.hessian * s.count + pooled * prior) / (s.count + prior) if s.count else pooled.clone()
