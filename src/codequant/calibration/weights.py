"""One weight: its initial codebook by the method's weight quantizer (the registry in
:mod:`codequant.quantizers.registry`), ACCF's reassignment, a linear calibrated on its own inputs,
and weights under calibration (:class:`WeightBook`) installed as deployable packed modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import QuantTarget
from ..config import QuantConfig
from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.format import PackedWeight, pack
from ..core.hadamard import block_hadamard
from ..modules.experts import CodeQuantExperts
from ..quantizers import accf
from ..quantizers.feedback import feedback_codebooks
from ..quantizers.registry import weight_quantizer
from ..quantizers.weight_quantizer import WeightStats
from .statistics import InputStats

if TYPE_CHECKING:
    from .driver import Quantizer


@dataclass
class WeightBook:
    """A weight under calibration: its target, trainable codebook, the weight it approximates
    (with the online Hadamard folded in), its input statistics, its Hadamard block and how its
    input is quantized."""

    target: QuantTarget
    book: accf.Codebook
    weight: torch.Tensor
    stats: WeightStats
    hadamard_block: int
    act: ActQuantSpec


def needs_hessian(config: QuantConfig) -> bool:
    """Whether the method's weight quantizer declares it reads H = 2 E[xq xq^T]."""
    return "hessian" in weight_quantizer(config.recipe.weights).statistics(config)


def initial_codebook(weight: torch.Tensor, stats: WeightStats, config: QuantConfig, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, codebook) for weight [..., N, K] by the method's weight quantizer."""
    return weight_quantizer(config.recipe.weights).fit(weight, stats, config, group_size)


def experts_codebook(weight: torch.Tensor, stats: WeightStats, config: QuantConfig, group: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`initial_codebook` of an expert stack [E, N, K], ``chunk`` experts at a time:
    (idx uint8 [E, N, K], codebook [E, N, K // G, C]); each expert is fitted on its own."""
    idx = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    books = []
    for e0 in range(0, weight.shape[0], chunk):
        part = slice(e0, e0 + chunk)
        chunk_idx, chunk_cb = initial_codebook(weight[part], stats.part(part), config, group)
        idx[part] = chunk_idx
        books.append(chunk_cb)
    return idx, torch.cat(books)


def reassign(book: accf.Codebook, weight: torch.Tensor, stats: WeightStats, chunk: int = 0) -> None:
    """ACCF reassignment: by error feedback with the current centroids when H is known (a row
    keeps its indices unless the walk lowers its output error), else activation-weighted nearest;
    an expert stack [E, N, K] goes ``chunk`` experts at a time (0: all)."""
    a, b, hessian = stats
    if hessian is None:
        book.reassign(weight, a, b, chunk)
        return
    num = book.idx.shape[0]
    parts = [slice(e0, e0 + (chunk or num)) for e0 in range(0, num, chunk or num)] if book.idx.dim() == 3 else [slice(None)]
    with torch.no_grad():
        for part in parts:
            idx, _ = feedback_codebooks(weight[part], hessian[part], book.idx[part].long(), book.codebook.detach()[part], book.group_size, alternations=1, refit=False)
            book.idx[part] = idx


def calibrate_linear(q: Quantizer, layer: nn.Module, t: QuantTarget, x: torch.Tensor, full_name: str,
                     act: ActQuantSpec | None = None) -> WeightBook:
    """A linear (or router) of driver ``q``'s layer (or the model, for its head) fitted on its own
    inputs x [T, K]: codebooks, then ACCF on the output MSE ||Q(x) W_hat^T - x W^T||^2 / ||x W^T||^2;
    installed packed. ``act``: how its inputs are quantized (default: :meth:`Quantizer.act_for`). Returns its
    :class:`WeightBook` (for block-output tuning)."""
    config = q.config
    act = q.act_for(t) if act is None else act
    w, hb = q.weight_for(layer, t, act)
    transform = (lambda v: block_hadamard(v, hb)) if hb else None
    g = q.group(w.shape[-1], full_name)
    stats = InputStats.of(x, act, needs_hessian(config), q.device, transform, q.plan.token_batch).weight_stats()
    book = accf.Codebook(*initial_codebook(w, stats, config, g))
    if config.recipe.finetune:

        def loss_fn(batch):
            xb = x[batch].to(q.device)
            xb = transform(xb) if transform is not None else xb
            ref = xb @ w.T
            y = fake_quantize_activations(xb, act) @ book().T
            return (y - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-12)

        history = accf.finetune([book], loss_fn, x.shape[0], config.accf_epochs, config.accf_lr, config.accf_batch_tokens, lambda: reassign(book, w, stats), config.seed, eval_tokens=4 * config.accf_batch_tokens)
        q.report["accf"][full_name] = history
    wb = WeightBook(t, book, w, stats, hb, act)
    install_books(q, layer, {t.name: wb})
    return wb


def install_books(q: Quantizer, layer: nn.Module, books: dict[str, WeightBook]) -> None:
    """Replace each target of ``layer`` by its deployable packed module, its inputs quantized by
    its book's ``act`` (a router already quantized takes the new packed weight in place); an
    expert stack's two books are keyed ``NAME.gate_up`` and ``NAME.down``."""
    for key, wb in books.items():
        if wb.target.kind == "experts":
            if key.endswith(".gate_up"):
                down = books[f"{wb.target.name}.down"]
                module = CodeQuantExperts.from_packed(pack_experts(wb.book, q.plan.expert_chunk), pack_experts(down.book, q.plan.expert_chunk),
                                                      wb.act, down.act, down.hadamard_block)
                layer.set_submodule(wb.target.name, module)
        else:
            q.store.install(layer, wb.target, pack(wb.book.idx, wb.book.codebook.detach()), wb.hadamard_block, wb.act)


def pack_experts(book: accf.Codebook, chunk: int) -> PackedWeight:
    """:func:`pack` of an expert stack, ``chunk`` experts at a time."""
    codebook = book.codebook.detach()
    parts = [pack(book.idx[e0 : e0 + chunk], codebook[e0 : e0 + chunk]) for e0 in range(0, book.idx.shape[0], chunk)]
    return PackedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("indices", "codebook", "row_sum")), parts[0].in_features)
