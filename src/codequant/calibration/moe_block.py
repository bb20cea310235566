"""The MoE block calibrator: router, routed experts and shared experts of one block, fitted
together. Collect (full-precision outputs, routing, inputs), initial codebooks, ACCF on
block MSE + router KL, install the deployable modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import QuantTarget
from ..core.activations import ActQuantSpec
from ..core.hadamard import block_hadamard
from ..quantizers import accf
from ..quantizers.weight_quantizer import WeightStats
from .layers import block_output
from .statistics import InputStats, all_token_experts_stats, capture_inputs, concat, expert_hidden, experts_stats, routed_tokens, stacked
from .weights import WeightBook, experts_codebook, initial_codebook, install_books, needs_hessian, reassign

if TYPE_CHECKING:
    from .driver import Quantizer


class Routing(NamedTuple):
    """The routed experts' inputs x [T, H] and each token's chosen experts [T, top_k], on the host."""

    tokens: torch.Tensor
    top_k_index: torch.Tensor


class ExpertStats(NamedTuple):
    """Per-expert input statistics of the stacks gate_up [E, 2I, H] and down [E, H, I]."""

    gate_up: WeightStats
    down: WeightStats


class MoEBlockCalibrator:
    """Quantizes the MoE block ``block`` of decoder layer ``layer`` for the driver ``q``."""

    def __init__(self, q: Quantizer, layer: nn.Module, block: nn.Module, targets: list[QuantTarget], name: str):
        self.q, self.layer, self.block, self.targets, self.name = q, layer, block, targets, name
        self.router, self.experts = q.adapter.router(layer), q.adapter.experts(layer)
        self.router_w = self.router.weight.detach().float().clone()
        self.router_b = None if getattr(self.router, "bias", None) is None else self.router.bias.detach().float().clone()
        self.hessian = needs_hessian(q.config)

    def __call__(self, xm: torch.Tensor) -> dict[str, WeightBook]:
        """Calibrate on the block inputs xm [T, H] (on the host); returns the targets' books
        (for block-output tuning)."""
        stage = self.q.stage
        with stage("mlp/collect"):
            y_ref, inputs, routing = self.collect(xm)
        with stage("mlp/activation specs"):
            acts = self.input_specs(xm, inputs, routing)
        experts = next((t for t in self.targets if t.kind == "experts"), None)
        with stage("mlp/statistics"):
            expert_stats = self.expert_statistics(experts, routing, acts) if experts is not None else None
        del routing
        with stage("mlp/codebooks"):
            books = self.initial_books(xm, inputs, expert_stats, acts)
        if self.q.config.recipe.finetune:
            with stage("mlp/ACCF"):
                self.finetune(books, xm, y_ref)
        with stage("mlp/pack"):
            install_books(self.q, self.layer, books)
        return books

    def collect(self, xm: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], Routing]:
        """The full-precision block's outputs [T, H], its linear targets' inputs and its routing."""
        routed: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture_routing(module, args, kwargs):
            bound = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
            hidden = bound["hidden_states"].detach()
            routed.append((hidden.reshape(-1, hidden.shape[-1]).float().cpu(), bound["top_k_index"].detach().cpu()))

        hook = self.experts.register_forward_pre_hook(capture_routing, with_kwargs=True)
        store, handles = capture_inputs({t.name: t.module for t in self.targets if t.kind == "linear"})
        y_ref = torch.empty_like(xm)
        batch = self.q.plan.token_batch
        with torch.no_grad():
            for s in range(0, xm.shape[0], batch):
                y_ref[s : s + batch] = block_output(self.block, xm[s : s + batch].to(self.q.device)).cpu()
        hook.remove()
        for h in handles:
            h.remove()
        return y_ref, concat(store), Routing(torch.cat([h for h, _ in routed]), torch.cat([i for _, i in routed]))

    def input_specs(self, xm: torch.Tensor, inputs: dict[str, torch.Tensor], routing: Routing) -> dict[str, ActQuantSpec]:
        """How each book's input is quantized (keyed as the books): the linears' by :meth:`Quantizer.input_specs`;
        with ``act_clip_search`` the router's clip searched on the block inputs xm and an expert stack's
        gate_up and down clips each over every expert's routed tokens with its own weight."""
        q = self.q
        specs = q.input_specs(self.layer, [t for t in self.targets if t.kind == "linear"], inputs, self.name)
        for t in self.targets:
            full = f"{self.name}.{t.name}"
            if t.kind == "router":
                specs[t.name] = q.searched(q.act_for(t), [(xm.to(q.device), self.router_w)], [full])
            elif t.kind == "experts":
                hb, dev = q.hadamard_for(self.layer, t), self.experts.gate_up_proj.device
                down = lambda e: self.experts.down_proj[e].detach().float()  # noqa: E731
                gate_up = ((xe, self.experts.gate_up_proj[e].detach()) for e, xe in routed_tokens(routing.tokens, routing.top_k_index, dev))
                hidden = ((expert_hidden(self.experts, e, xe, hb), block_hadamard(down(e), hb) if hb else down(e))
                          for e, xe in routed_tokens(routing.tokens, routing.top_k_index, dev))
                specs[f"{t.name}.gate_up"] = q.searched(q.act_for(t), gate_up, [f"{full}.gate_up_proj"])
                specs[f"{t.name}.down"] = q.searched(q.act_for(t), hidden, [f"{full}.down_proj"])
        return specs

    def expert_statistics(self, t: QuantTarget, routing: Routing, acts: dict[str, ActQuantSpec]) -> ExpertStats:
        """Each expert's statistics over its routed tokens; an expert no token reached takes them
        from every token (``calibrate_all_experts``) or gets a = b = 1 (data-free k-means)."""
        q, full = self.q, f"{self.name}.{t.name}"
        hb = q.hadamard_for(self.layer, t)
        gu_act, down_act = acts[f"{t.name}.gate_up"], acts[f"{t.name}.down"]
        gu_stats, d_stats = experts_stats(self.experts, routing.tokens, routing.top_k_index, gu_act, down_act, hb, self.hessian)
        unreached = [e for e, s in enumerate(gu_stats) if s.count == 0]
        if unreached:
            q.report["unreached_experts"][full] = unreached
        if unreached and q.config.calibrate_all_experts:  # statistics from every token
            for e, gu, dn in all_token_experts_stats(self.experts, routing.tokens, unreached, gu_act, down_act, hb, self.hessian, q.plan.token_batch):
                gu_stats[e], d_stats[e] = gu, dn
        else:
            for e in unreached:  # data-free k-means for experts no token reached
                gu_stats[e] = InputStats(torch.ones_like(gu_stats[e].a), torch.ones_like(gu_stats[e].b), 0, gu_stats[e].hessian)  # H: pooled
        return ExpertStats(stacked(gu_stats), stacked(d_stats))

    def initial_books(self, xm: torch.Tensor, inputs: dict[str, torch.Tensor], expert_stats: ExpertStats | None,
                      acts: dict[str, ActQuantSpec]) -> dict[str, WeightBook]:
        """Initial codebooks of every target by the method's weight quantizer, inputs quantized by
        ``acts``; the experts' two stacks are keyed ``NAME.gate_up`` and ``NAME.down``."""
        q, config = self.q, self.q.config
        books: dict[str, WeightBook] = {}
        for t in self.targets:
            full = f"{self.name}.{t.name}"
            if t.kind == "experts":
                hb = q.hadamard_for(self.layer, t)
                gu_w = self.experts.gate_up_proj.detach().float()
                d_w = self.experts.down_proj.detach().float()
                if hb:
                    d_w = block_hadamard(d_w, hb)
                gi, gc = experts_codebook(gu_w, expert_stats.gate_up, config, q.group(gu_w.shape[-1], f"{full}.gate_up_proj"), q.plan.expert_chunk)
                di, dc = experts_codebook(d_w, expert_stats.down, config, q.group(d_w.shape[-1], f"{full}.down_proj"), q.plan.expert_chunk)
                books[f"{t.name}.gate_up"] = WeightBook(t, accf.Codebook(gi, gc), gu_w, expert_stats.gate_up, 0, acts[f"{t.name}.gate_up"])
                books[f"{t.name}.down"] = WeightBook(t, accf.Codebook(di, dc), d_w, expert_stats.down, hb, acts[f"{t.name}.down"])
            else:
                act = acts[t.name]
                if t.kind == "router":
                    w, hb, x_in = self.router_w, 0, xm
                else:
                    w, hb = q.weight_for(self.layer, t, act)
                    x_in = inputs.pop(t.name)
                transform = (lambda v, hb=hb: block_hadamard(v, hb)) if hb else None
                stats = InputStats.of(x_in, act, self.hessian, q.device, transform, q.plan.token_batch).weight_stats()
                idx, cb = initial_codebook(w, stats, config, q.group(w.shape[-1], full))
                books[t.name] = WeightBook(t, accf.Codebook(idx, cb), w, stats, hb, act)
        return books

    def finetune(self, books: dict[str, WeightBook], xm: torch.Tensor, y_ref: torch.Tensor) -> None:
        """ACCF on ||block_hat(x) - block(x)||^2 / E[block(x)^2] + lambda KL(p_router || p_router_hat),
        every weight simulated as C[idx] with quantized inputs; reassigned after each epoch."""
        q, config = self.q, self.q.config
        sims, experts_target = [], None
        for wb in books.values():
            if wb.target.kind == "experts":
                experts_target = wb.target
            else:
                sims.append(accf.SimulatedWeight(wb.target.module, wb.book, accf.InputTransform(wb.act, wb.hadamard_block)))
        if experts_target is not None:
            gu, dn = books[f"{experts_target.name}.gate_up"], books[f"{experts_target.name}.down"]
            sim_experts = accf.SimulatedExperts(gu.book, dn.book, self.experts.act_fn, accf.InputTransform(gu.act), accf.InputTransform(dn.act, dn.hadamard_block))
            self.layer.set_submodule(experts_target.name, sim_experts)
        scale = y_ref.pow(2).mean().clamp(min=1e-12)
        router = next((wb for wb in books.values() if wb.target.kind == "router"), None)

        def loss_fn(batch):
            xb = xm[batch].to(q.device)
            loss = (block_output(self.block, xb) - y_ref[batch].to(q.device)).pow(2).mean() / scale
            if router is not None:
                loss = loss + config.router_kl_weight * accf.router_kl(xb, self.router_w, self.router.weight, self.router_b, router.act)
            return loss

        def reassign_all():
            for wb in books.values():
                reassign(wb.book, wb.weight, wb.stats, q.plan.expert_chunk)

        steps = config.accf_epochs * -(-xm.shape[0] // config.accf_batch_tokens)
        bar = tqdm(total=steps, desc=f"ACCF {self.name} MoE block", leave=False, disable=not q.progress)
        history = accf.finetune([wb.book for wb in books.values()], loss_fn, xm.shape[0], config.accf_epochs, config.accf_lr, config.accf_batch_tokens, reassign_all, config.seed, bar.update, eval_tokens=4 * config.accf_batch_tokens)
        bar.close()
        q.report["accf"][f"{self.name}.mlp"] = history
        for sim in sims:
            sim.remove()
        if experts_target is not None:
            self.layer.set_submodule(experts_target.name, self.experts)
