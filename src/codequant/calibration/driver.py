"""The per-layer driver: prepare each decoder layer (norms folded, R1, R2, POG), calibrate its
attention linears and its MLP / MoE block on the outputs of the already-quantized layers
before it, and propagate the calibration stream through it. A finished layer is saved under
``OUT.partial/``; rerunning the same command resumes there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import QuantTarget, get_adapter
from ..config import QuantConfig
from ..core.activations import ActQuantSpec
from ..core.format import check_group_size
from ..core.hadamard import block_hadamard, largest_power_of_two_block
from ..io.output import partial_dir
from ..transforms.norm_fold import fold_norms
from ..transforms.permutation import apply_pog
from ..transforms.rotation import rotate_residual, rotate_value_heads
from ..utils import atomic_save_tensors
from .act_clip import ClipSearch
from .layer_store import LayerStore
from .layer_tuning import tune_layer
from .layers import InMemoryLayers, LayerRunner, on_device
from .loading import resolve_device
from .moe_block import MoEBlockCalibrator
from .resources import GIB, StageClock, host_rss_peak_gib, plan_memory
from .rotations import r1_rotation
from .statistics import collect_inputs
from .weights import WeightBook, calibrate_linear

log = logging.getLogger("codequant")


class Quantizer:
    """One quantization run (see the module doc). Use :func:`quantize`.

    ``layers`` reads and frees decoder layers (:class:`InMemoryLayers` or a
    :class:`~.streaming.StreamedModel`); a streamed run with ``out_dir`` frees each layer once saved.
    """

    def __init__(self, model, config: QuantConfig, out_dir: Path | None, progress: bool, clock: StageClock | None = None, layers=None):
        self.model, self.config, self.progress = model, config, progress
        self.adapter = get_adapter(model)
        self.layers = layers or InMemoryLayers(model, self.adapter)
        self.streamed = layers is not None
        self.free_done = self.streamed and out_dir is not None
        self.prepared: dict[int, str] = {}  # layer index -> "folded" | "rotated"
        self.r1: torch.Tensor | None = None
        self.device = resolve_device(config.device)
        self.clock = clock or StageClock()
        self.plan = plan_memory(self.adapter.layers(model), self._routed_experts, max(config.accf_batch_tokens, 8 * config.seqlen), config.max_gpu_memory)
        self.partial = partial_dir(out_dir) if out_dir is not None else None
        self.act = ActQuantSpec(config.abits, config.act_group_size, config.act_clip)
        router_bits = config.abits if config.router_abits is None else config.router_abits
        self.router_act = ActQuantSpec(router_bits, config.act_group_size, config.act_clip)
        self.make_r1 = r1_rotation(config.recipe.rotation)
        # where the online block Hadamard runs, when activations are quantized and R1 rotates the stream:
        # "down_proj" (every MLP / expert down projection), "o_proj" (every attention output projection)
        online = config.abits < 16 and self.make_r1 is not None
        self.online_hadamard = tuple(place for place, on in (("down_proj", config.online_hadamard), ("o_proj", config.o_proj_hadamard)) if on and online)
        self.report: dict = {"unreached_experts": {}, "accf": {}, "block_tuning": {}, "act_clip": {}}
        self.store = LayerStore(self.adapter, config.wbits, self.device, self.partial, self.report)

    # stage selection ---------------------------------------------------------------------
    def _selected(self, layer: nn.Module, target: QuantTarget) -> bool:
        kinds = self.config.targets
        attn = self.adapter.layout.attention + "."
        if target.kind in ("router", "experts"):
            return target.kind in kinds
        if target.name.startswith(attn):
            return "attention" in kinds
        return ("shared_experts" if self.adapter.is_moe(layer) else "dense_mlp") in kinds

    def check_expert_activations(self) -> None:
        """Refuse routed experts whose activation is not SiLU: every deployed kernel computes
        silu(x W_g^T) * (x W_u^T), so another act_fn would be calibrated right and run wrong."""
        probe = torch.linspace(-6, 6, 97)
        for i, layer in enumerate(self.adapter.layers(self.model)):
            for t in self.adapter.quant_targets(layer):
                if t.kind == "experts" and not torch.allclose(t.module.act_fn(probe), F.silu(probe), atol=1e-6):
                    raise ValueError(
                        f"{self.adapter.layer_name(i)}.{t.name} uses the expert activation {type(t.module.act_fn).__name__}, "
                        "but CodeQuant's expert kernels compute SiLU (SwiGLU) only; this model cannot be quantized "
                        "faithfully (supported: experts with hidden_act silu)"
                    )

    def group(self, k: int, name: str) -> int:
        try:
            return check_group_size(self.config.group_size, k)
        except ValueError:
            raise ValueError(f"--group-size {self.config.group_size} does not divide the row length {k} of {name}; "
                             f"choose a divisor of {k}") from None

    def hadamard_for(self, layer: nn.Module, target: QuantTarget) -> int:
        """The online Hadamard block before ``target``'s input (0: none): the largest power of two
        dividing its input width, at the places in :attr:`online_hadamard`."""
        if "o_proj" in self.online_hadamard and target.name == f"{self.adapter.layout.attention}.{self.adapter.layout.attention_writer}":
            return largest_power_of_two_block(target.module.in_features)
        if "down_proj" not in self.online_hadamard:
            return 0
        downs = {id(t.module) for t in self.adapter.down_projections(layer)}
        if id(target.module) not in downs:
            return 0
        k = target.module.down_proj.shape[-1] if target.kind == "experts" else target.module.in_features
        return largest_power_of_two_block(k)

    def act_for(self, target: QuantTarget) -> ActQuantSpec:
        """How ``target``'s input is quantized before any clip search: the router's spec (``router_abits``) or the run's."""
        return self.router_act if target.kind == "router" else self.act

    def input_specs(self, layer: nn.Module, targets: list[QuantTarget], inputs: dict[str, torch.Tensor], name: str) -> dict[str, ActQuantSpec]:
        """The activation spec of each linear of ``targets`` (its inputs in ``inputs``): :meth:`act_for`,
        with ``act_clip_search`` one clip ratio per set of targets reading equal inputs (q/k/v of one
        attention), searched on their summed output error (:mod:`.act_clip`)."""
        specs = {t.name: self.act_for(t) for t in targets}
        if not self.config.act_clip_search:
            return specs
        groups: list[list[QuantTarget]] = []
        for t in targets:
            same = next((g for g in groups if specs[g[0].name] == specs[t.name] and self.hadamard_for(layer, g[0]) == self.hadamard_for(layer, t)
                         and torch.equal(inputs[g[0].name], inputs[t.name])), None)
            if same is None:
                groups.append([t])
            else:
                same.append(t)
        for group in groups:
            spec = specs[group[0].name]
            weights, hb = zip(*(self.weight_for(layer, t, spec) for t in group))
            x = inputs[group[0].name].to(self.device)
            best = self.searched(spec, [(block_hadamard(x, hb[0]) if hb[0] else x, torch.cat(weights))], [f"{name}.{t.name}" for t in group])
            specs |= {t.name: best for t in group}
        return specs

    def searched(self, spec: ActQuantSpec, parts, names: list[str]) -> ActQuantSpec:
        """``spec`` with the clip ratio of least summed output error over ``parts`` (an iterable of
        (input [T, K] as the module sees it, weight [N, K])), reported for the modules ``names``;
        ``spec`` itself without ``act_clip_search`` or when it quantizes nothing."""
        if not (self.config.act_clip_search and spec.enabled):
            return spec
        search = ClipSearch(spec)
        for x, w in parts:
            search.add(x, w)
        best = search.best()
        self.report["act_clip"] |= {n: best.clip for n in names}
        return best

    def _routed_experts(self, layer: nn.Module) -> nn.Module | None:
        return self.adapter.experts(layer) if self.adapter.is_moe(layer) else None

    def act_group(self, k: int, name: str) -> None:
        """--act-group-size checked against the input width ``k`` of ``name`` when activations are quantized."""
        g = self.config.act_group_size
        if self.config.abits < 16 and g and k % g:
            raise ValueError(f"--act-group-size {g} does not divide the input width {k} of {name}; "
                             f"choose a divisor of {k}, or 0 for one scale per token")

    def check_group_sizes(self) -> None:
        """Every codebook group and activation group divides its row, checked before calibration starts."""
        for i, layer in enumerate(self.adapter.layers(self.model)):
            for t in self.adapter.quant_targets(layer):
                name = f"{self.adapter.layer_name(i)}.{t.name}"
                if t.kind == "experts":
                    widths = {f"{name}.gate_up_proj": t.module.gate_up_proj.shape[-1], f"{name}.down_proj": t.module.down_proj.shape[-1]}
                else:
                    widths = {name: t.module.weight.shape[-1]}
                for what, k in widths.items():
                    self.group(k, what)
                    self.act_group(k, what)

    # global transforms -----------------------------------------------------------------
    def transform(self, tokens: torch.Tensor) -> None:
        """Norm folding and R1 for the embedding, final norm and lm_head; R1 made by the
        method's entry in :data:`~.rotations.R1_ROTATIONS` or resumed. Each layer gets its
        part in :meth:`open_layer`."""
        fold_norms(self.model, self.adapter, layers=(), outside=True)
        if self.make_r1 is None:
            return
        saved = self.partial / "rotation.safetensors" if self.partial else None
        r1 = load_file(str(saved))["R1"] if saved is not None and saved.is_file() else self.make_r1(self, tokens)
        if saved is not None:
            atomic_save_tensors({"R1": r1.contiguous()}, saved)
        self.r1 = r1.to(torch.float64)
        rotate_residual(self.model, self.adapter, self.r1, layers=(), outside=True)

    def open_layer(self, i: int, rotated: bool) -> nn.Module:
        """Decoder layer ``i``, read if streamed, with its norms folded and (``rotated``) R1, R2
        and POG applied: the same weights :meth:`transform` of the whole model would give."""
        layer = self.layers.load(i)
        if i not in self.prepared:
            fold_norms(self.model, self.adapter, layers=(i,), outside=False)
            self.prepared[i] = "folded"
        if rotated and self.prepared[i] == "folded":
            if self.r1 is not None:
                rotate_residual(self.model, self.adapter, self.r1, layers=(i,), outside=False)
                if self.config.value_rotation:
                    rotate_value_heads(self.model, self.adapter, self.config.seed, layers=(i,))
                if self.config.recipe.permute and self.config.group_size:
                    apply_pog(self.model, self.adapter, self.config.group_size, layers=(i,))
            self.prepared[i] = "rotated"
        return layer

    def close_layer(self, i: int, done: bool) -> None:
        """Free a streamed layer: ``done`` (quantized and saved) keeps its modules on the meta
        device for the checkpoint's specs, else it is read and prepared again when opened next."""
        if self.streamed:
            self.layers.release(i, reset=not done)
            self.prepared.pop(i, None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.adapter.embed_tokens(self.model)
        with torch.no_grad():
            return emb(tokens).float().cpu()

    # the layer loop --------------------------------------------------------------------
    def run(self, tokens: torch.Tensor) -> None:
        x = self.embed(tokens)
        run = LayerRunner(self.model, self.adapter, self.device)
        layers = self.adapter.layers(self.model)
        bar = tqdm(range(len(layers)), desc="quantizing layers", unit="layer", disable=not self.progress)
        start = time.time()
        for i in bar:
            self.stage_bar = bar
            with self.stage("load"):
                layer = self.open_layer(i, rotated=True)
            with on_device(layer, self.device):
                saved = self.partial / f"layer_{i:04d}.safetensors" if self.partial else None
                if saved is not None and saved.is_file():
                    with self.stage("resume"):
                        self.store.restore_layer(layer, saved)
                else:
                    self.quantize_layer(i, layer, x, run)
                    if saved is not None:
                        with self.stage("save layer"):
                            self.store.save_layer(layer, saved, self.adapter.layer_name(i))
                self.store.set_backend(layer, "reference")
                with self.stage("propagate"):
                    x = run(i, layer, x)
                self.store.set_backend(layer, None)
            if self.free_done:  # its tensors are in OUT.partial, the checkpoint reads them there
                self.close_layer(i, done=True)
            elapsed = time.time() - start
            log.info("layer %d of %d done: %.0f s elapsed, about %.0f s left, peak GPU %.2f GiB, peak host RSS %.2f GiB", i + 1, len(layers), elapsed,
                     elapsed / (i + 1) * (len(layers) - i - 1), self.clock.peak_gpu_total / GIB, host_rss_peak_gib())
        self.stage_bar = None
        if "lm_head" in self.config.targets:
            with self.stage("lm_head"):
                self.quantize_head(x)

    stage_bar = None

    @torch.no_grad()
    def quantize_head(self, x: torch.Tensor) -> None:
        """The lm_head as a weight-only codebook linear, fitted on its inputs: the final norm of
        the last layer's output x [n, S, H] (every layer quantized). Not saved under ``OUT.partial``:
        a resumed run fits it again."""
        head, norm = self.adapter.lm_head(self.model), self.adapter.final_norm(self.model)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"target lm_head: the model's output head is a {type(head).__name__}, not an nn.Linear; "
                             "drop lm_head from the targets")
        inputs = norm(x.flatten(0, 1)).float()
        target = QuantTarget(self.adapter.layout.lm_head, "linear", head.to(self.device, torch.float32))
        calibrate_linear(self, self.model, target, inputs, target.name, ActQuantSpec(16))
        self.model.get_submodule(target.name).to("cpu")

    def stage(self, name: str):
        """Account the block to stage ``name`` and show it on the progress bar."""
        if self.stage_bar is not None:
            self.stage_bar.set_postfix_str(name)
        return self.clock.stage(name)

    @torch.no_grad()  # statistics and k-means must not record autograd graphs (they held ~10x a layer); ACCF enables grad itself
    def quantize_layer(self, i: int, layer: nn.Module, x: torch.Tensor, run: LayerRunner) -> None:
        """Quantize layer ``i``'s selected targets on the stream x [n, S, H] (its input, on the
        host): attention, then the MLP / MoE block, then (``block_tuning_epochs``) block-output
        tuning of all of them against the full-precision layer's output."""
        tune = self.config.recipe.finetune and self.config.block_tuning_epochs > 0
        y_ref = None
        if tune:
            with self.stage("block tuning/reference"):
                y_ref = run(i, layer, x)  # the full-precision layer's output, before any target is quantized
        books = self.quantize_targets(i, layer, x, run)
        if tune and books:
            with self.stage("block tuning"):
                name = self.adapter.layer_name(i)
                self.report["block_tuning"][name] = tune_layer(self, i, layer, books, x, y_ref)

    def quantize_targets(self, i: int, layer: nn.Module, x: torch.Tensor, run: LayerRunner) -> dict[str, WeightBook]:
        """Calibrate and install layer ``i``'s selected targets; returns their books."""
        targets = [t for t in self.adapter.quant_targets(layer) if self._selected(layer, t)]
        attn_prefix = self.adapter.layout.attention + "."
        attention = [t for t in targets if t.name.startswith(attn_prefix)]
        mlp = [t for t in targets if not t.name.startswith(attn_prefix)]
        name = self.adapter.layer_name(i)
        books: dict[str, WeightBook] = {}
        # attention linears, on inputs from the full-precision attention
        with self.stage("attention"):
            inputs = collect_inputs({t.name: t.module for t in attention}, lambda: run(i, layer, x))
            specs = self.input_specs(layer, attention, inputs, name)
            for t in attention:
                books[t.name] = calibrate_linear(self, layer, t, inputs.pop(t.name), f"{name}.{t.name}", specs[t.name])
        if not mlp:
            return books
        # MLP block, on inputs from the quantized attention
        with self.stage("mlp"):
            block = self.adapter.mlp(layer)
            self.store.set_backend(layer, "reference")
            xm = collect_inputs({"block": block}, lambda: run(i, layer, x))["block"]
            if self.adapter.is_moe(layer):
                books |= MoEBlockCalibrator(self, layer, block, mlp, name)(xm)
            else:
                @torch.no_grad()
                def run_block():
                    for s in range(0, xm.shape[0], self.plan.token_batch):
                        block(xm[s : s + self.plan.token_batch][None].to(self.device))

                inputs = collect_inputs({t.name: t.module for t in mlp}, run_block)
                specs = self.input_specs(layer, mlp, inputs, name)
                for t in mlp:
                    books[t.name] = calibrate_linear(self, layer, t, inputs.pop(t.name), f"{name}.{t.name}", specs[t.name])
        return books

    def weight_for(self, layer, t: QuantTarget, act: ActQuantSpec) -> tuple[torch.Tensor, int]:
        """The weight the quantizer sees (with the online Hadamard folded in; none for a
        weight-only ``act``) and its block."""
        hb = self.hadamard_for(layer, t) if act.enabled else 0
        w = t.module.weight.detach().float()
        return (block_hadamard(w, hb) if hb else w), hb

