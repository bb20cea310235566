"""ACCF: adaptive clustering with centroid fine-tuning, on simulated quantized modules.

During calibration a quantized weight is W_hat = C[idx] with the codebook C a trainable
parameter and idx fixed between reassignments. Every weight's gradient flows into its
centroid (the sum over members: the true gradient). Objectives (METHOD.md):
  * attention linears:  || Q(x) W_hat^T - x W^T ||^2 on the linear's own inputs;
  * MoE blocks:         || block_hat(x) - block(x) ||^2 + lambda KL(p_router || p_router_hat).
After each epoch every weight is reassigned to argmin_c (b_k w - a_k c)^2 with
a_k = E[x_k^2], b_k = E[x_k xq_k] (:func:`codequant.quantizers.codebook.assign`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..core.hadamard import block_hadamard
from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.swiglu import swiglu
from .codebook import assign


class _Lookup(torch.autograd.Function):
    """W_hat[..., n, k] = C[..., n, k // G, idx[..., n, k]] whose backward sums each weight's
    gradient into its centroid, dC[..., n, g, c] = sum_{k in g, idx = c} dW_hat[..., n, k].
    It keeps idx in uint8 for the backward pass (torch.gather keeps an int64 copy: 8 bytes per
    weight, 4.8 GiB for one Qwen3-30B-A3B layer's experts)."""

    @staticmethod
    def forward(ctx, codebook: torch.Tensor, idx: torch.Tensor, group: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.group, ctx.codebook_shape = group, codebook.shape
        return torch.gather(codebook, -1, _grouped(idx, group)).reshape(idx.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        grouped = _grouped(idx, ctx.group)
        grad_codebook = grad.new_zeros(ctx.codebook_shape).scatter_add_(-1, grouped, grad.reshape(grouped.shape))
        return grad_codebook, None, None


def _grouped(idx: torch.Tensor, group: int) -> torch.Tensor:
    """idx [..., K] as int64 [..., K // G, G]."""
    return idx.long().reshape(*idx.shape[:-1], idx.shape[-1] // group, group)


class Codebook(nn.Module):
    """The parametrization W -> W_hat = C[idx]: trainable C [..., N, K/G, C], fixed idx [..., N, K].

    idx is held as uint8 (an eighth of int64: for a stack of experts it is the largest tensor
    of the run); ``expert(e)`` reconstructs one leading slice, so a stack of experts never
    needs its whole W_hat (or its gradient) at once."""

    def __init__(self, idx: torch.Tensor, codebook: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", idx.to(torch.uint8))
        self.codebook = nn.Parameter(codebook.float().clone())

    @property
    def group_size(self) -> int:
        return self.idx.shape[-1] // self.codebook.shape[-2]

    def forward(self, _original: torch.Tensor | None = None) -> torch.Tensor:
        return _Lookup.apply(self.codebook, self.idx, self.group_size)

    def expert(self, e: int) -> torch.Tensor:
        """W_hat[e] = C[e][idx[e]] for a stack [E, N, K]."""
        return _Lookup.apply(self.codebook[e], self.idx[e], self.group_size)

    @torch.no_grad()
    def reassign(self, weight: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, chunk: int = 0) -> None:
        """idx <- :func:`assign` (W, C, a, b), over ``chunk`` leading slices at a time (0: all)."""
        if not chunk or self.idx.dim() < 3:
            self.idx.copy_(assign(weight, self.codebook, self.group_size, a, b))
            return
        per_slice = lambda t, s: t if t is None or t.dim() < 2 else t[s]  # noqa: E731  (a, b: [K] or [E, K])
        for e0 in range(0, self.idx.shape[0], chunk):
            s = slice(e0, e0 + chunk)
            self.idx[s] = assign(weight[s], self.codebook[s], self.group_size, per_slice(a, s), per_slice(b, s))


class InputTransform:
    """Forward pre-hook: optional online block Hadamard, then activation fake-quantization."""

    def __init__(self, act: ActQuantSpec, hadamard_block: int = 0):
        self.act, self.hadamard_block = act, hadamard_block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard_block:
            x = block_hadamard(x, self.hadamard_block)
        return fake_quantize_activations(x, self.act)

    def hook(self, module, args):
        return (self(args[0]),) + tuple(args[1:])


class SimulatedWeight:
    """Attach a :class:`Codebook` parametrization and an input transform to a module's
    ``weight`` (an nn.Linear or a router); :meth:`remove` restores the plain module. ``transform``
    None: the module quantizes its own input (a router already quantized)."""

    def __init__(self, module: nn.Module, codebook: Codebook, transform: InputTransform | None):
        self.module, self.codebook, self.transform = module, codebook, transform
        parametrize.register_parametrization(module, "weight", codebook, unsafe=True)
        self.handle = module.register_forward_pre_hook(transform.hook) if transform is not None else None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=True)


class SimulatedExperts(nn.Module):
    """Routed SwiGLU experts on :class:`Codebook` weights with quantized inputs: the
    differentiable twin of :class:`codequant.modules.experts.CodeQuantExperts`."""

    def __init__(self, gate_up: Codebook, down: Codebook, act_fn, transform: InputTransform, down_transform: InputTransform):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.act_fn, self.transform, self.down_transform = act_fn, transform, down_transform

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = self.transform(hidden_states)
        out = torch.zeros(hidden_states.shape[0], self.down.idx.shape[-2], dtype=torch.float32, device=hidden_states.device)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            h = self.down_transform(swiglu(F.linear(x[tok].float(), self.gate_up.expert(e)), self.act_fn))
            out = out.index_add(0, tok, F.linear(h, self.down.expert(e)) * top_k_weights[tok, slot, None].float())
        return out.to(hidden_states.dtype)


def finetune(
    codebooks: list[Codebook],
    loss_fn,
    num_tokens: int,
    epochs: int,
    lr: float,
    batch_tokens: int,
    reassign,
    seed: int = 0,
    progress=None,
    eval_tokens: int = 0,
) -> list[float]:
    """Adam on the codebooks of ``codebooks`` minimising ``loss_fn(token_index)`` over
    shuffled minibatches; ``reassign()`` after every epoch. Returns the objective over all
    tokens (a fixed sample of ``eval_tokens`` of them; 0: all) before fine-tuning and after
    each epoch (epochs + 1 values); the codebooks and
    indices end at the best of these states, so ACCF never ends worse than its start."""
    params = [c.codebook for c in codebooks]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)

    held = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed + 1))[: eval_tokens or num_tokens]

    def objective() -> float:
        with torch.no_grad():
            batches = held.split(batch_tokens)
            return sum(float(loss_fn(b)) * len(b) for b in batches) / len(held)

    def snapshot():
        return [(c.idx.clone(), c.codebook.detach().clone()) for c in codebooks]

    history = [objective()]
    best, best_state = history[0], snapshot()
    for _ in range(epochs):
        order = torch.randperm(num_tokens, generator=g)
        for batch in order.split(batch_tokens):
            with torch.enable_grad():  # callers calibrate under no_grad
                loss = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if progress is not None:
                progress()
        reassign()
        history.append(objective())
        if history[-1] < best:
            best, best_state = history[-1], snapshot()
    with torch.no_grad():
        for c, (idx, codebook) in zip(codebooks, best_state):
            c.idx.copy_(idx)
            c.codebook.copy_(codebook)
    return history


def kl_divergence(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(logits_ref) || softmax(logits))."""
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(logits_ref.float(), -1), log_target=True, reduction="batchmean")


def router_kl(x: torch.Tensor, weight: torch.Tensor, weight_hat: torch.Tensor, bias: torch.Tensor | None, act: ActQuantSpec) -> torch.Tensor:
    """ACCF's router term: KL(softmax(x W^T + b) || softmax(Q_act(x) W_hat^T + b)), mean over the tokens x [T, H]."""
    return kl_divergence(F.linear(x, weight, bias), F.linear(fake_quantize_activations(x, act), weight_hat, bias))
