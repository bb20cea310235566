"""The CodeQuant driver: load, transform, then quantize one decoder layer at a time.

    model -> fold norms -> R1 (random Hadamard, or AOS-trained) -> [R2] -> POG
          -> for each layer i (on the chosen device, the rest on the CPU):
               attention linears: codebooks (or RTN / GPTQ) [+ ACCF on output MSE]
               MLP / MoE block:   router, experts, shared experts [+ ACCF on block MSE + router KL]
               X_{i+1} = quantized_layer_i(X_i)   (calibrate, then propagate)
          -> packed checkpoint

Each layer is calibrated on the outputs of the already-quantized layers before it. A
finished layer is saved under ``OUT.partial/``; rerunning the same command resumes there.

With ``stream``, a model given as a directory or hub id is streamed (:mod:`.streaming`): each decoder layer is
read from disk when its turn comes, folded and rotated on its own, and (with an output
directory) freed once its packed tensors are saved; the learned R1 takes two passes over the
layers (collect activations, then quantize). The result equals the in-memory path's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import SUPPORTED_ARCHITECTURES, ArchitectureAdapter, QuantTarget, get_adapter
from ..config import QuantConfig
from ..core.format import PackedWeight, bits_per_weight, pack
from ..io.output import check_output, partial_dir, run_record, start_or_resume
from ..modules.experts import CodeQuantExperts
from ..modules.linear import CodeQuantLinear
from ..modules.registry import quantized_modules
from ..modules.router import CodeQuantRouter, quantize_router
from ..quantizers import accf
from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..quantizers.codebook import check_group_size, fit_codebooks
from ..quantizers.feedback import feedback_codebooks
from ..quantizers.gptq import gptq
from ..quantizers.uniform import rtn
from ..core.hadamard import block_hadamard, largest_power_of_two_block, random_hadamard
from ..transforms.norm_fold import fold_norms
from ..transforms.permutation import apply_pog
from ..transforms.rotation import rotate_residual, rotate_value_heads, train_rotation
from ..utils import atomic_save_tensors
from .data import calibration_windows, load_texts, sample_from_model
from .resources import StageClock, cap_device_memory, host_rss_peak_gib, plan_memory

log = logging.getLogger("codequant")


@dataclass
class QuantResult:
    model: nn.Module | None  # None when a streamed run freed its layers into ``out_dir``: load the checkpoint
    tokenizer: object
    report: dict = field(default_factory=dict)


# -- loading --------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def check_source(name_or_path: str) -> str:
    """The local directory or hub id of a supported model (clear errors otherwise)."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {name_or_path} does not exist or holds no config.json; give a Hugging Face model "
            "directory or a hub id such as Qwen/Qwen3-30B-A3B"
        )
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else name_or_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load model {name_or_path!r}: {e}") from None
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {config.model_type!r} ({', '.join(config.architectures or [])}); "
            f"CodeQuant supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return str(path) if looks_local else name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face directory or a hub id, on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = check_source(name_or_path)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.eval()
    model.codequant_source_dtype = config.dtype or dtype  # the checkpoint's own dtype, for saving
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


# -- calibration data -------------------------------------------------------------------
def calibration_tokens(full_model, tokenizer, config: QuantConfig, cache: Path | None, model_dir: str | None) -> tuple[torch.Tensor, str]:
    """[nsamples, seqlen] tokens and a description of where they came from; ``full_model()``
    gives the full-precision model to sample from when no data source is configured."""
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            tokens, source = f.get_tensor("tokens"), (f.metadata() or {}).get("source", f"cached {cache}")
        if tokens.shape == (config.nsamples, config.seqlen):
            return tokens, source
    if config.calib:
        texts = load_texts(config.calib, model_dir)
        tokens, source = calibration_windows(tokenizer, texts, config.nsamples, config.seqlen, config.seed), config.calib
    else:
        log.info("no calibration data given: sampling %d x %d tokens from the full-precision model", config.nsamples, config.seqlen)
        tokens = sample_from_model(full_model(), tokenizer, config.nsamples, config.seqlen, config.seed)
        source = "text sampled from the full-precision model (data-free)"
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"tokens": tokens.contiguous()}, cache, {"source": source})
    return tokens, source


# -- running layers ---------------------------------------------------------------------
class LayerRunner:
    """Runs decoder layer i of ``model`` standalone on [n, S, H] streams, in batches: the
    stream stays on the host, each batch visits the device."""

    def __init__(self, model, adapter: ArchitectureAdapter, device: torch.device, batch_size: int = 8):
        self.model, self.adapter, self.device, self.batch_size = model, adapter, device, batch_size

    @torch.no_grad()
    def __call__(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for s in range(0, x.shape[0], self.batch_size):
            h = x[s : s + self.batch_size].to(self.device)
            y = layer(h, **self.adapter.layer_kwargs(self.model, h, None, i))
            out[s : s + self.batch_size] = (y[0] if isinstance(y, tuple) else y).to(out.device)
        return out


def _capture_inputs(modules: dict[str, nn.Module]):
    """Forward pre-hooks that collect each module's first input as [tokens, features] on the host."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
        for name, m in modules.items()
    ]
    return store, handles


def _cat(store: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat(v) for k, v in store.items()}


def _collect_inputs(modules: dict[str, nn.Module], forward) -> dict[str, torch.Tensor]:
    """Each module's inputs [tokens, features] (on the host) while ``forward()`` runs."""
    store, handles = _capture_inputs(modules)
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return _cat(store)


# -- per-target statistics --------------------------------------------------------------
@dataclass
class InputStats:
    """a_k = E[x_k^2], b_k = E[x_k xq_k] (xq = Q_act(x)), and for GPTQ H = 2 E[xq xq^T]."""

    a: torch.Tensor
    b: torch.Tensor
    count: int
    hessian: torch.Tensor | None = None

    @classmethod
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


def _expert_hidden(experts: nn.Module, e: int, x: torch.Tensor, hadamard: int) -> torch.Tensor:
    """Expert e's down-projection input act(x G_e^T) * (x U_e^T) (times H_b with the online Hadamard)."""
    gate, up = F.linear(x, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
    h = experts.act_fn(gate) * up
    return block_hadamard(h, hadamard) if hadamard else h


def _all_token_experts_stats(experts: nn.Module, x: torch.Tensor, which: list[int], act: ActQuantSpec, down_act: ActQuantSpec,
                             hadamard: int, hessian: bool, batch: int):
    """(e, gate_up stats, down stats) for each expert e in ``which`` over every token of x [T, H]
    (on the host; batches of ``batch`` tokens visit the experts' device), whatever the routing:
    gate_up sees x itself (one InputStats shared by all), down sees :func:`_expert_hidden` of x.
    For experts the routing never reached, so their codebooks are fit to data, not data-free."""
    dev = experts.gate_up_proj.device
    shared = InputStats.of(x, act, hessian, dev, batch=batch)
    return [(e, shared, InputStats.of(x, down_act, hessian, dev, lambda v, e=e: _expert_hidden(experts, e, v, hadamard), batch)) for e in which]


def _experts_stats(experts: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, act: ActQuantSpec, down_act: ActQuantSpec, hadamard: int, hessian: bool):
    """Per-expert input statistics of gate_up and down over each expert's routed tokens (x [T, H]
    and top_k_index may live on the host; each expert's tokens visit the experts' device)."""
    num, hidden, inter = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1]
    dev = experts.gate_up_proj.device
    gu = [InputStats(torch.ones(hidden, device=dev), torch.ones(hidden, device=dev), 0, torch.eye(hidden, device=dev) if hessian else None) for _ in range(num)]
    dn = [InputStats(torch.ones(inter, device=dev), torch.ones(inter, device=dev), 0, torch.eye(inter, device=dev) if hessian else None) for _ in range(num)]
    for e in torch.unique(top_k_index).tolist():
        tok = torch.nonzero((top_k_index == e).any(-1)).squeeze(-1)
        xe = x[tok].to(dev)
        gu[e], dn[e] = InputStats.of(xe, act, hessian), InputStats.of(_expert_hidden(experts, e, xe, hadamard), down_act, hessian)
    if hessian:
        _pool_expert_hessians(gu)
        _pool_expert_hessians(dn)
    return gu, dn


def _pool_expert_hessians(stats: list[InputStats]) -> None:
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


# -- quantizing one weight ----------------------------------------------------------------
def initial_codebook(weight: torch.Tensor, stats: list[InputStats] | InputStats | None, config: QuantConfig, group_size: int):
    """(idx, codebook) for weight [..., N, K] by the method's weight quantizer."""
    recipe = config.recipe
    if recipe.weights == "rtn":
        return rtn(weight, config.wbits, group_size)
    if recipe.weights == "gptq":
        return gptq(weight, _stack_stats(stats)[2], config.wbits, group_size)
    if stats is None:
        importance = None
    elif isinstance(stats, list):
        importance = torch.stack([s.a for s in stats])
    else:
        importance = stats.a
    idx, codebook = fit_codebooks(weight, config.wbits, group_size, importance, config.kmeans_iters, config.seed)
    hessian = _stack_stats(stats)[2] if stats is not None else None
    if hessian is not None and config.weight_assignment == "feedback":
        idx, codebook = feedback_codebooks(weight, hessian, idx, codebook, group_size, config.feedback_alternations)
    return idx, codebook


def needs_hessian(config: QuantConfig) -> bool:
    """GPTQ and the feedback codebook assignment need H = 2 E[xq xq^T] per weight."""
    return config.recipe.weights == "gptq" or (config.recipe.weights == "codebook" and config.weight_assignment == "feedback")


def _stack_stats(stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, hessian or None) of one InputStats or stacked over a list of them."""
    if isinstance(stats, list):
        hessian = torch.stack([s.hessian for s in stats]) if stats[0].hessian is not None else None
        return torch.stack([s.a for s in stats]), torch.stack([s.b for s in stats]), hessian
    return stats.a, stats.b, stats.hessian


def _reassign(book: accf.Codebook, weight: torch.Tensor, stats: tuple, chunk: int = 0) -> None:
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


# -- the driver ---------------------------------------------------------------------------
class InMemoryLayers:
    """The decoder layers of a model already in memory: nothing to read or free."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter):
        self.model, self.adapter = model, adapter

    def load(self, i: int) -> nn.Module:
        return self.adapter.layers(self.model)[i]

    def release(self, i: int, reset: bool) -> None:
        pass


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
        self.use_online_hadamard = config.online_hadamard and config.abits < 16 and config.recipe.rotation != "none"
        self.report: dict = {"unreached_experts": {}, "accf": {}}

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

    def _group(self, k: int, name: str) -> int:
        g = self.config.group_size or k
        if k % g:
            raise ValueError(f"--group-size {g} does not divide the row length {k} of {name}; choose a divisor of {k}")
        return check_group_size(g, k)

    def _hadamard_for(self, layer: nn.Module, target: QuantTarget) -> int:
        if not self.use_online_hadamard:
            return 0
        downs = {id(t.module) for t in self.adapter.down_projections(layer)}
        if id(target.module) not in downs:
            return 0
        k = target.module.down_proj.shape[-1] if target.kind == "experts" else target.module.in_features
        return largest_power_of_two_block(k)

    def _routed_experts(self, layer: nn.Module) -> nn.Module | None:
        return self.adapter.experts(layer) if self.adapter.is_moe(layer) else None

    def check_group_sizes(self) -> None:
        for i, layer in enumerate(self.adapter.layers(self.model)):
            for t in self.adapter.quant_targets(layer):
                name = f"{self.adapter.layer_name(i)}.{t.name}"
                if t.kind == "experts":
                    self._group(t.module.gate_up_proj.shape[-1], f"{name}.gate_up_proj")
                    self._group(t.module.down_proj.shape[-1], f"{name}.down_proj")
                else:
                    self._group(t.module.weight.shape[-1], name)

    # global transforms -----------------------------------------------------------------
    def transform(self, tokens: torch.Tensor) -> None:
        """Norm folding and R1 for the embedding, final norm and lm_head; R1 chosen (random
        Hadamard, AOS-trained or resumed). Each layer gets its part in :meth:`open_layer`."""
        recipe = self.config.recipe
        fold_norms(self.model, self.adapter, layers=(), outside=True)
        if recipe.rotation == "none":
            return
        hidden = self.adapter.hidden_size(self.model)
        saved = self.partial / "rotation.safetensors" if self.partial else None
        if saved is not None and saved.is_file():
            r1 = load_file(str(saved))["R1"]
        elif recipe.rotation == "hadamard":
            r1 = random_hadamard(hidden, self.config.seed)
        else:
            r1 = self.learn_rotation(tokens)
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

    @torch.no_grad()
    def learn_rotation(self, tokens: torch.Tensor) -> torch.Tensor:
        """AOS: sample normalized stream activations of every layer, train R1 on them."""
        g = torch.Generator().manual_seed(self.config.seed)
        samples: list[torch.Tensor] = []

        run = LayerRunner(self.model, self.adapter, self.device)
        per_batch = -(-self.config.rotation_tokens * run.batch_size // tokens.shape[0])

        def sample(module, args, out):
            acts = out.detach().reshape(-1, out.shape[-1]).float()
            pick = torch.randperm(acts.shape[0], generator=g)[:per_batch]
            samples.append(acts[pick.to(acts.device)].cpu())

        x = self.embed(tokens)
        for i in tqdm(range(len(self.adapter.layers(self.model))), desc="AOS: collecting activations", disable=not self.progress):
            layer = self.open_layer(i, rotated=False)
            with on_device(layer, self.device):
                norms = (self.adapter.input_norm(layer), self.adapter.post_attention_norm(layer))
                hooks = [m.register_forward_hook(sample) for m in norms]
                x = run(i, layer, x)
                for h in hooks:
                    h.remove()
            self.close_layer(i, done=False)
        acts = torch.cat(samples).to(self.device)
        bar = tqdm(total=self.config.rotation_steps, desc="AOS: training R1", disable=not self.progress)
        bits = self.config.abits if self.config.abits < 16 else 4
        with torch.enable_grad():
            r1 = train_rotation(acts, bits, self.config.rotation_steps, self.config.rotation_lr, seed=self.config.seed, progress=lambda step, loss: bar.update(1))
        bar.close()
        return r1.cpu()

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
            with self._stage("load"):
                layer = self.open_layer(i, rotated=True)
            with on_device(layer, self.device):
                saved = self.partial / f"layer_{i:04d}.safetensors" if self.partial else None
                if saved is not None and saved.is_file():
                    with self._stage("resume"):
                        self.restore_layer(layer, saved)
                else:
                    self.quantize_layer(i, layer, x, run)
                    if saved is not None:
                        with self._stage("save layer"):
                            self.save_layer(layer, saved, self.adapter.layer_name(i))
                self._set_backend(layer, "reference")
                with self._stage("propagate"):
                    x = run(i, layer, x)
                self._set_backend(layer, None)
            if self.free_done:  # its tensors are in OUT.partial, the checkpoint reads them there
                self.close_layer(i, done=True)
            elapsed = time.time() - start
            log.info("layer %d of %d done: %.0f s elapsed, about %.0f s left", i + 1, len(layers), elapsed, elapsed / (i + 1) * (len(layers) - i - 1))
        self.stage_bar = None

    stage_bar = None

    def _stage(self, name: str):
        """Account the block to stage ``name`` and show it on the progress bar."""
        if self.stage_bar is not None:
            self.stage_bar.set_postfix_str(name)
        return self.clock.stage(name)

    def quantize_layer(self, i: int, layer: nn.Module, x: torch.Tensor, run: LayerRunner) -> None:
        targets = [t for t in self.adapter.quant_targets(layer) if self._selected(layer, t)]
        attn_prefix = self.adapter.layout.attention + "."
        attention = [t for t in targets if t.name.startswith(attn_prefix)]
        mlp = [t for t in targets if not t.name.startswith(attn_prefix)]
        name = self.adapter.layer_name(i)
        # attention linears, on inputs from the full-precision attention
        with self._stage("attention"):
            inputs = _collect_inputs({t.name: t.module for t in attention}, lambda: run(i, layer, x))
            for t in attention:
                self.quantize_linear_alone(layer, t, inputs.pop(t.name), f"{name}.{t.name}")
        if not mlp:
            return
        # MLP block, on inputs from the quantized attention
        with self._stage("mlp"):
            block = self.adapter.mlp(layer)
            self._set_backend(layer, "reference")
            xm = _collect_inputs({"block": block}, lambda: run(i, layer, x))["block"]
            if self.adapter.is_moe(layer):
                self.quantize_moe_block(layer, block, mlp, xm, name)
            else:
                @torch.no_grad()
                def run_block():
                    for s in range(0, xm.shape[0], self.plan.token_batch):
                        block(xm[s : s + self.plan.token_batch][None].to(self.device))

                inputs = _collect_inputs({t.name: t.module for t in mlp}, run_block)
                for t in mlp:
                    self.quantize_linear_alone(layer, t, inputs.pop(t.name), f"{name}.{t.name}")

    def _weight_for(self, layer, t: QuantTarget) -> tuple[torch.Tensor, int]:
        """The weight the quantizer sees (with the online Hadamard folded in) and its block."""
        hb = self._hadamard_for(layer, t)
        w = t.module.weight.detach().float()
        return (block_hadamard(w, hb) if hb else w), hb

    def quantize_linear_alone(self, layer: nn.Module, t: QuantTarget, x: torch.Tensor, full_name: str) -> None:
        """A linear (or router) fitted on its own inputs: codebooks, then ACCF on output MSE."""
        w, hb = self._weight_for(layer, t)
        transform = (lambda v: block_hadamard(v, hb)) if hb else None
        g = self._group(w.shape[-1], full_name)
        stats = InputStats.of(x, self.act, needs_hessian(self.config), self.device, transform, self.plan.token_batch)
        idx, cb = initial_codebook(w, stats, self.config, g)
        if self.config.recipe.finetune:
            book = accf.Codebook(idx, cb)

            def loss_fn(batch):
                xb = x[batch].to(self.device)
                xb = transform(xb) if transform is not None else xb
                ref = xb @ w.T
                y = fake_quantize_activations(xb, self.act) @ book().T
                return (y - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-12)

            history = accf.finetune([book], loss_fn, x.shape[0], self.config.accf_epochs, self.config.accf_lr, self.config.accf_batch_tokens, lambda: _reassign(book, w, _stack_stats(stats)), self.config.seed, eval_tokens=4 * self.config.accf_batch_tokens)
            self.report["accf"][full_name] = history
            idx, cb = book.idx, book.codebook.detach()
        self.install(layer, t, pack(idx, cb), hb)

    def quantize_moe_block(self, layer: nn.Module, block: nn.Module, targets: list[QuantTarget], xm: torch.Tensor, name: str) -> None:
        """Router, experts and shared experts, fine-tuned together on block MSE + router KL."""
        hessian = needs_hessian(self.config)
        router = self.adapter.router(layer)
        experts = self.adapter.experts(layer)
        router_w = router.weight.detach().float().clone()
        router_b = None if getattr(router, "bias", None) is None else router.bias.detach().float().clone()
        # full-precision targets and routing
        routed: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture_routing(module, args, kwargs):
            bound = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
            hidden = bound["hidden_states"].detach()
            routed.append((hidden.reshape(-1, hidden.shape[-1]).float().cpu(), bound["top_k_index"].detach().cpu()))

        hook = experts.register_forward_pre_hook(capture_routing, with_kwargs=True)
        linear_targets = [t for t in targets if t.kind == "linear"]
        store, handles = _capture_inputs({t.name: t.module for t in linear_targets})
        y_ref = torch.empty_like(xm)
        batch = self.plan.token_batch
        with torch.no_grad():
            for s in range(0, xm.shape[0], batch):
                y_ref[s : s + batch] = _block_output(block, xm[s : s + batch].to(self.device)).cpu()
        hook.remove()
        for h in handles:
            h.remove()
        x_experts = torch.cat([h for h, _ in routed])
        top_k_index = torch.cat([i for _, i in routed])
        del routed
        inputs = _cat(store)
        del store
        # initial codebooks
        books: dict[str, tuple[QuantTarget, accf.Codebook, torch.Tensor, object, int]] = {}
        for t in targets:
            full = f"{name}.{t.name}"
            if t.kind == "experts":
                hb = self._hadamard_for(layer, t)
                gu_w = experts.gate_up_proj.detach().float()
                d_w = experts.down_proj.detach().float()
                if hb:
                    d_w = block_hadamard(d_w, hb)
                gu_stats, d_stats = _experts_stats(experts, x_experts, top_k_index, self.act, self.act, hb, hessian)
                unreached = [e for e, s in enumerate(gu_stats) if s.count == 0]
                if unreached:
                    self.report["unreached_experts"][full] = unreached
                if unreached and self.config.calibrate_all_experts:  # statistics from every token
                    for e, gu, dn in _all_token_experts_stats(experts, x_experts, unreached, self.act, self.act, hb, hessian, batch):
                        gu_stats[e], d_stats[e] = gu, dn
                else:
                    for e in unreached:  # data-free k-means for experts no token reached
                        gu_stats[e] = InputStats(torch.ones_like(gu_stats[e].a), torch.ones_like(gu_stats[e].b), 0, gu_stats[e].hessian)  # H: pooled
                del x_experts, top_k_index
                gi, gc = self._experts_codebook(gu_w, gu_stats, self._group(gu_w.shape[-1], f"{full}.gate_up_proj"))
                di, dc = self._experts_codebook(d_w, d_stats, self._group(d_w.shape[-1], f"{full}.down_proj"))
                books[f"{t.name}.gate_up"] = (t, accf.Codebook(gi, gc), gu_w, _stack_stats(gu_stats), hb)
                books[f"{t.name}.down"] = (t, accf.Codebook(di, dc), d_w, _stack_stats(d_stats), hb)
            else:
                if t.kind == "router":
                    w, hb, x_in = router_w, 0, xm
                else:
                    w, hb = self._weight_for(layer, t)
                    x_in = inputs.pop(t.name)
                transform = (lambda v, hb=hb: block_hadamard(v, hb)) if hb else None
                stats = InputStats.of(x_in, self.act, hessian, self.device, transform, batch)
                idx, cb = initial_codebook(w, stats, self.config, self._group(w.shape[-1], full))
                books[t.name] = (t, accf.Codebook(idx, cb), w, _stack_stats(stats), hb)
        if self.config.recipe.finetune:
            self.finetune_moe_block(layer, block, router, experts, books, xm, y_ref, router_w, router_b, name)
        # install the deployable modules
        for key, (t, book, _, _, hb) in books.items():
            if t.kind == "experts":
                if key.endswith(".gate_up"):
                    down = books[f"{t.name}.down"][1]
                    module = CodeQuantExperts.from_packed(self._pack_experts(book), self._pack_experts(down), self.act, self.act, hb)
                    layer.set_submodule(t.name, module)
            else:
                self.install(layer, t, pack(book.idx, book.codebook.detach()), hb)

    def _experts_codebook(self, weight: torch.Tensor, stats: list[InputStats], group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`initial_codebook` of an expert stack [E, N, K], ``plan.expert_chunk`` experts at
        a time: (idx uint8 [E, N, K], codebook [E, N, K // G, C]); each expert is fitted on its own."""
        idx = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
        books = []
        for e0 in range(0, weight.shape[0], self.plan.expert_chunk):
            part = slice(e0, e0 + self.plan.expert_chunk)
            chunk_idx, chunk_cb = initial_codebook(weight[part], stats[part], self.config, group)
            idx[part] = chunk_idx
            books.append(chunk_cb)
        return idx, torch.cat(books)

    def _pack_experts(self, book: accf.Codebook) -> PackedWeight:
        """:func:`pack` of an expert stack, ``plan.expert_chunk`` experts at a time."""
        codebook = book.codebook.detach()
        parts = [pack(book.idx[e0 : e0 + self.plan.expert_chunk], codebook[e0 : e0 + self.plan.expert_chunk]) for e0 in range(0, book.idx.shape[0], self.plan.expert_chunk)]
        return PackedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("indices", "codebook", "row_sum")), parts[0].in_features)

    def finetune_moe_block(self, layer, block, router, experts, books, xm, y_ref, router_w, router_b, name) -> None:
        sims, experts_target = [], None
        for key, (t, book, _, _, hb) in books.items():
            if t.kind == "experts":
                experts_target = t
            else:
                sims.append(accf.SimulatedWeight(t.module, book, accf.InputTransform(self.act, hb)))
        original_experts = experts
        if experts_target is not None:
            gu, dn = books[f"{experts_target.name}.gate_up"], books[f"{experts_target.name}.down"]
            sim_experts = accf.SimulatedExperts(gu[1], dn[1], experts.act_fn, accf.InputTransform(self.act), accf.InputTransform(self.act, dn[4]))
            layer.set_submodule(experts_target.name, sim_experts)
        scale = y_ref.pow(2).mean().clamp(min=1e-12)
        router_book = next((b[1] for b in books.values() if b[0].kind == "router"), None)

        def loss_fn(batch):
            xb = xm[batch].to(self.device)
            loss = (_block_output(block, xb) - y_ref[batch].to(self.device)).pow(2).mean() / scale
            if router_book is not None:
                logits = F.linear(fake_quantize_activations(xb, self.act), router.weight, router_b)
                loss = loss + self.config.router_kl_weight * accf.kl_divergence(F.linear(xb, router_w, router_b), logits)
            return loss

        def reassign():
            for t, book, w, stats, _ in books.values():
                _reassign(book, w, stats, self.plan.expert_chunk)

        steps = self.config.accf_epochs * -(-xm.shape[0] // self.config.accf_batch_tokens)
        bar = tqdm(total=steps, desc=f"ACCF {name} MoE block", leave=False, disable=not self.progress)
        with torch.enable_grad():
            history = accf.finetune([b[1] for b in books.values()], loss_fn, xm.shape[0], self.config.accf_epochs, self.config.accf_lr, self.config.accf_batch_tokens, reassign, self.config.seed, bar.update, eval_tokens=4 * self.config.accf_batch_tokens)
        bar.close()
        self.report["accf"][f"{name}.mlp"] = history
        for sim in sims:
            sim.remove()
        if experts_target is not None:
            layer.set_submodule(experts_target.name, original_experts)

    def install(self, layer: nn.Module, t: QuantTarget, weight: PackedWeight, hadamard_block: int) -> None:
        if t.kind == "router":
            quantize_router(t.module, weight, self.act)
            return
        bias = None if t.module.bias is None else t.module.bias.detach().float()
        layer.set_submodule(t.name, CodeQuantLinear.from_packed(weight, bias, self.act, hadamard_block))

    # resume -----------------------------------------------------------------------------
    def save_layer(self, layer: nn.Module, path: Path, layer_name: str) -> None:
        """The layer's checkpoint tensors (packed modules, biases, norms; not the weights of quantized
        routers, rebuilt at load), with its specs, the names of its parameters and its part of the
        report (unreached experts, ACCF losses)."""
        specs = {}
        for name, module in layer.named_modules():
            if isinstance(module, CodeQuantLinear):
                specs[name] = {"kind": "linear", "hadamard_block": module.hadamard_block}
            elif isinstance(module, CodeQuantExperts):
                specs[name] = {"kind": "experts", "hadamard_block": module.hadamard_block}
            elif isinstance(module, CodeQuantRouter):
                specs[name] = {"kind": "router", "hadamard_block": 0}
        skip = {f"{name}.weight" for name, spec in specs.items() if spec["kind"] == "router"}
        tensors = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items() if k not in skip}
        params = sorted(k for k, _ in layer.named_parameters() if k not in skip)
        report = {key: {k: v for k, v in self.report[key].items() if k.startswith(layer_name + ".")} for key in ("unreached_experts", "accf")}
        atomic_save_tensors(tensors, path, {"specs": json.dumps(specs), "params": json.dumps(params), "report": json.dumps(report)})

    def saved_layer_tensors(self, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of freed layer ``i`` (names relative to the model) from its
        ``OUT.partial`` file, float parameters cast to ``dtype`` as the in-memory path does."""
        from safetensors import safe_open

        prefix = self.adapter.layer_name(i) + "."
        with safe_open(str(self.partial / f"layer_{i:04d}.safetensors"), "pt") as f:
            params = set(json.loads(f.metadata()["params"]))
            out = {}
            for key in f.keys():
                t = f.get_tensor(key)
                out[prefix + key] = t.to(dtype) if key in params and t.is_floating_point() else t
        return out

    def restore_layer(self, layer: nn.Module, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            specs = json.loads(f.metadata()["specs"])
            for key, part in json.loads(f.metadata()["report"]).items():
                self.report[key].update(part)
        tensors = load_file(str(path), device=str(self.device))
        for name, spec in specs.items():
            module = layer.get_submodule(name)
            pw = lambda prefix, k: PackedWeight(tensors[f"{name}.{prefix}indices"], tensors[f"{name}.{prefix}codebook"], tensors[f"{name}.{prefix}row_sum"], k)  # noqa: E731
            if spec["kind"] == "experts":
                new = CodeQuantExperts.from_packed(pw("gate_up_", module.gate_up_proj.shape[-1]), pw("down_", module.down_proj.shape[-1]), self.act, self.act, spec["hadamard_block"])
                layer.set_submodule(name, new)
            elif spec["kind"] == "router":
                quantize_router(module, pw("", module.weight.shape[-1]), self.act)
            else:
                bias = tensors.get(f"{name}.bias")
                layer.set_submodule(name, CodeQuantLinear.from_packed(pw("", module.in_features), bias, self.act, spec["hadamard_block"]))

    @staticmethod
    def _set_backend(layer: nn.Module, backend: str | None) -> None:
        for m in layer.modules():
            if isinstance(m, (CodeQuantLinear, CodeQuantExperts)):
                m.backend = backend


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An MLP / MoE block's output for tokens x [T, H], as float32 [T, H]."""
    out = block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape).float()


@contextlib.contextmanager
def on_device(layer: nn.Module, device: torch.device):
    """Hold ``layer`` on ``device`` in float32 for the block; then back on the CPU in its dtype."""
    dtype = next(layer.parameters()).dtype
    layer.to(device, torch.float32)
    try:
        yield layer
    finally:
        layer.to("cpu")
        _cast_float_params(layer, dtype)



def _cast_float_params(layer: nn.Module, dtype: torch.dtype) -> None:
    for p in layer.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def model_bits_per_weight(model: nn.Module, bits: int) -> float:
    """Bits per quantized weight on disk at ``bits``-bit indices, over every packed module
    (codebooks and row constants included; what :func:`codequant.io.checkpoint_summary` reads back)."""
    total, count = 0.0, 0
    for module in quantized_modules(model).values():
        for w in module.packed_weights().values():
            n = w.indices.shape[:-1].numel() * w.in_features
            total, count = total + bits_per_weight(w, bits) * n, count + n
    return total / max(count, 1)


def peak_memory() -> dict:
    """Peak host RSS and torch's peak GPU allocation since the last reset of its statistics."""
    out = {"peak_host_rss_gib": round(host_rss_peak_gib(), 3)}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def quantize(
    model: str | nn.Module,
    config: QuantConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    tokenizer=None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
) -> QuantResult:
    """Quantize ``model`` (a hub id, a local directory, or a loaded model with ``tokenizer``)
    by ``config``; with ``out_dir``, write the packed checkpoint there (resumable; an existing
    checkpoint there is replaced only with ``overwrite``, see :mod:`codequant.io.output`).
    ``calibration`` [nsamples, seqlen] tokens replace the config's data source."""
    config = config or QuantConfig()
    start = time.time()
    clock = StageClock()
    source = model if isinstance(model, str) else None
    if out_dir is not None:  # before any work: nothing the user owns is overwritten, a resume matches its run
        check_output(out_dir, source, overwrite)
        record = run_record(source, json.loads(config.fingerprint()), config.calib)
        start_or_resume(partial_dir(out_dir), record, create=False)
    dtype = torch.float32 if resolve_device(config.device).type == "cpu" else torch.bfloat16
    streamed = None
    if isinstance(model, str) and config.stream:
        from transformers import AutoTokenizer

        from .streaming import StreamedModel, resolve_model_dir

        with clock.stage("load"):
            directory = resolve_model_dir(check_source(model))
            streamed = StreamedModel(directory, dtype)
            streamed.load_globals()
            model, tokenizer = streamed.model, AutoTokenizer.from_pretrained(str(directory))
    elif isinstance(model, str):
        with clock.stage("load"):
            model, tokenizer = load_model(model, dtype)
    out = Path(out_dir) if out_dir is not None else None
    q = Quantizer(model, config, out, progress, clock, streamed)
    log.info("memory plan: %d experts per chunk, %d tokens per batch, about %.2f GiB of device memory per layer",
             q.plan.expert_chunk, q.plan.token_batch, q.plan.need_bytes / 2**30)
    cap_device_memory(q.device, config.max_gpu_memory)
    q.check_group_sizes()
    q.check_expert_activations()
    if q.partial is not None:
        start_or_resume(q.partial, record)
    cache = q.partial / "calibration_tokens.safetensors" if q.partial else None
    if streamed is None:
        model.to("cpu")
    if calibration is not None:
        tokens, data_source = calibration, "calibration tokens given by the caller"
    else:
        with clock.stage("calibration data"):
            tokens, data_source = calibration_tokens(lambda: _full_model(model, source, dtype, streamed), tokenizer, config, cache, source)
    log.info("calibration data: %s (%d x %d tokens)", data_source, *tokens.shape)
    rotary = q.adapter.rotary_emb(model).to(q.device)
    with clock.stage("transforms (norm folding, rotations)"):
        q.transform(tokens)
    q.run(tokens)
    rotary.to("cpu")
    report = {
        "method": config.method,
        "wbits": config.wbits,
        "abits": config.abits,
        "group_size": config.group_size,
        "calibration": data_source,
        "bits_per_weight": round(model_bits_per_weight(model, config.wbits), 4),
        "unreached_experts": q.report["unreached_experts"],
        "accf_loss_per_epoch": q.report["accf"],
    }
    if out is not None:
        from ..io.checkpoint import save_quantized

        extra = {"method": config.method, "config": config.to_dict(), "calibration": data_source, "source_model": source,
                 "rotations": {"r1": config.recipe.rotation, "r2": config.value_rotation, "online_hadamard": "down_proj" if q.use_online_hadamard else None}}
        save_dtype = getattr(model, "codequant_source_dtype", None) or torch.float32
        _cast_float_params(model, save_dtype)
        saved = {q.adapter.layer_name(i): (lambda i=i: q.saved_layer_tensors(i, save_dtype)) for i in range(len(q.adapter.layers(model)))} if q.free_done else None
        with clock.stage("save"):
            save_quantized(model, out, tokenizer, extra, bits=config.wbits, saved_elsewhere=saved)
        _remove_tree(q.partial)
        report["out_dir"] = str(out)
    report["seconds"] = round(time.time() - start, 1)
    report.update(clock.report())
    return QuantResult(None if q.free_done else model, tokenizer, report)


def _full_model(model: nn.Module, source: str | None, dtype: torch.dtype, streamed) -> nn.Module:
    """The whole full-precision model (to sample calibration text from): ``model`` itself, or for a
    streamed run a complete copy loaded for the purpose (freed after sampling)."""
    if streamed is None:
        return model
    log.warning("sampling calibration text needs the whole model in host memory; give --calib to keep a streamed run within a few layers")
    return load_model(source, dtype)[0]


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
