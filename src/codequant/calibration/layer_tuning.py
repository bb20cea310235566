"""Block-output tuning: once every target of a decoder layer is quantized (attention linears,
router, experts, shared experts), their codebooks are tuned together against the full-precision
layer's output on the calibration stream, AutoRound's objective on CodeQuant's parametrization.

The layer runs simulated: each weight is W_hat = C[idx] (:class:`~codequant.quantizers.accf.Codebook`,
C trainable, idx fixed between epochs) with its inputs fake-quantized as deployed, so the loss

    || layer_hat(x) - layer(x) ||^2 / || layer(x) - x ||^2  +  lambda KL(p_router || p_router_hat)

sees attention, routing and experts at once (normalized by the layer's update, not by the
residual stream it adds to; the router term is ACCF's). Adam on the centroids through
:func:`~codequant.quantizers.accf.finetune` (reassignment after every epoch, the best state
kept), then the deployable packed modules are installed again. Indices and the packed format
are those of ACCF; only centroid values change.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quantizers import accf
from .weights import WeightBook, install_books, reassign

if TYPE_CHECKING:
    from .driver import Quantizer


@contextlib.contextmanager
def frozen(layer: nn.Module, trained: list[torch.Tensor]):
    """No gradient for the layer's parameters but ``trained`` (norms, biases, original weights) in the block."""
    keep = {id(p) for p in trained}
    grads = {p: p.requires_grad for p in layer.parameters() if id(p) not in keep}
    for p in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)


class SimulatedLayer:
    """Decoder layer ``layer`` with every book simulated (see the module doc) until :meth:`remove`.

    Attention and dense linears are put back as their float modules with a Codebook
    parametrization and an input transform; a quantized router keeps its own input quantization
    under the parametrization; an expert stack becomes :class:`~codequant.quantizers.accf.SimulatedExperts`.
    ``router_inputs`` collects what the router saw in the last forward (for the KL term)."""

    def __init__(self, q: Quantizer, layer: nn.Module, books: dict[str, WeightBook]):
        self.layer, self.sims, self.router_inputs = layer, [], []
        self.router: WeightBook | None = None
        self.handle = None
        for key, wb in books.items():
            t = wb.target
            if t.kind == "experts":
                if key.endswith(".gate_up"):
                    down = books[f"{t.name}.down"]
                    experts = accf.SimulatedExperts(wb.book, down.book, t.module.act_fn, accf.InputTransform(wb.act), accf.InputTransform(down.act, down.hadamard_block))
                    layer.set_submodule(t.name, experts)
            elif t.kind == "router":
                self.router = wb
                self.sims.append(accf.SimulatedWeight(t.module, wb.book, None))  # a CodeQuantRouter: quantizes its input itself
                self.handle = t.module.register_forward_pre_hook(lambda _m, args: self.router_inputs.append(args[0].reshape(-1, args[0].shape[-1])), prepend=True)
            else:
                layer.set_submodule(t.name, t.module)
                self.sims.append(accf.SimulatedWeight(t.module, wb.book, accf.InputTransform(wb.act, wb.hadamard_block)))

    def router_kl(self) -> torch.Tensor | None:
        """KL(full-precision router || quantized router) on the router inputs of the last forward."""
        if self.router is None or not self.router_inputs:
            return None
        x = torch.cat(self.router_inputs).float()
        self.router_inputs.clear()
        module = self.router.target.module
        return accf.router_kl(x, self.router.weight, module.weight, getattr(module, "bias", None), self.router.act)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        for sim in self.sims:
            sim.remove()


def tune_layer(q: Quantizer, i: int, layer: nn.Module, books: dict[str, WeightBook], x: torch.Tensor, y_ref: torch.Tensor) -> list[float]:
    """Tune the codebooks of ``books`` (layer ``i``'s quantized targets, installed packed) for
    ``block_tuning_epochs`` epochs on the stream x [n, S, H] against the full-precision layer's
    outputs y_ref [n, S, H] (both on the host), then install the packed modules again. Returns
    the objective on held-out sequences before tuning and after each epoch."""
    config = q.config
    seqs = max(1, config.accf_batch_tokens // x.shape[1])  # sequences per step: ACCF's tokens per step
    scale = sum(float((y_ref[s : s + seqs] - x[s : s + seqs]).pow(2).sum()) for s in range(0, x.shape[0], seqs)) / y_ref.numel()
    scale = max(scale, 1e-12)
    sim = SimulatedLayer(q, layer, books)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        xb = x[batch].to(q.device)
        out = layer(xb, **q.adapter.layer_kwargs(q.model, xb, None, i))
        out = out[0] if isinstance(out, tuple) else out
        loss = (out.float() - y_ref[batch].to(q.device)).pow(2).mean() / scale
        kl = sim.router_kl()
        return loss if kl is None else loss + config.router_kl_weight * kl

    def reassign_all():
        for wb in books.values():
            reassign(wb.book, wb.weight, wb.stats, q.plan.expert_chunk)

    try:
        codebooks = [wb.book for wb in books.values()]
        with frozen(layer, [c.codebook for c in codebooks]), torch.enable_grad():
            history = accf.finetune(codebooks, loss_fn, x.shape[0], config.block_tuning_epochs, config.block_tuning_lr, seqs, reassign_all,
                                    config.seed, eval_tokens=4 * seqs)
    finally:
        sim.remove()
        install_books(q, layer, books)
    return history
