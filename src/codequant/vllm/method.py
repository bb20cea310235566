"""The ``codequant`` quantization method of vLLM: packed linears, routers and fused experts.

Importing this module registers :class:`CodeQuantVllmConfig` with vLLM. When vLLM opens a
checkpoint (a local directory; a Hub name is refused), the config checks all of it
(``codequant.io.verify_checkpoint``: truncation, checksums, format version, the specs bound into
the weight files, dtypes, shapes, padding, row sums; no other ``*.safetensors`` file that
vLLM would load as weights) and refuses checkpoints whose vLLM output is not verified against
transformers (architectures other than :data:`VERIFIED_ARCHITECTURES`, index widths other than
4 bits; on the CPU, latent attention of other than :data:`CPU_MLA_LATENT` channels). Each quantized linear (vLLM's merged ``qkv_proj`` / ``gate_up_proj`` too) and each
router gets :class:`CodeQuantLinearMethod`; the routed experts get :class:`CodeQuantMoEMethod`,
which runs the project's fused MoE kernel after vLLM's router. Both compute with
:mod:`codequant.kernels`, the ops the transformers modules call. DeepSeek-V2's ``kv_b_proj``
gets :class:`CodeQuantLatentMethod`: vLLM's multi-head latent attention folds that weight into
the query and output at decode, so it is dequantized at load, and its input transform moves to
the latent cache's input (see :mod:`codequant.vllm.models`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from .. import kernels
from ..core.activations import ActQuantSpec, fake_quantize_activations
from ..core.format import CODEBOOK_DTYPE, CODEBOOK_SIZE, PackedWeight, padded_columns
from ..core.hadamard import block_hadamard
from ..io.checkpoint import INDEX_FILE, verify_checkpoint, weight_files
from ..io.schema import QUANT_METHOD, CheckpointError, act_from_dict
from ..io.hf_quantizer import CodeQuantConfig
from .sharding import column_shard_features, column_shard_part, row_slice, shard_row_sum

try:
    from ..kernels import cpu as cpu_kernels
except ImportError:  # CPU kernels not built: vLLM's own head
    cpu_kernels = None

# vLLM's merged layers and the checkpoint projections they stack, in shard order
DEFAULT_PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
# vLLM module names that differ from the checkpoint's (transformers 5) names: (vLLM, checkpoint) parts
VLLM_TO_CHECKPOINT = ((".block_sparse_moe.", ".mlp."),)  # Mixtral's MoE block


# the model classes whose vLLM output tests/vllm_serving/test_serving.py checks against transformers
VERIFIED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
                          "LlamaForCausalLM", "Qwen3ForCausalLM", "DeepseekV2ForCausalLM")
# the index width those tests cover (16-centroid codebooks)
VERIFIED_BITS = 4
# the one latent size (kv_lora_rank + qk_rope_head_dim) vLLM's CPU MLA decode kernel runs: DeepSeek-V2's 512 + 64
CPU_MLA_LATENT = 576
UNQUANTIZED = ActQuantSpec(bits=16)  # a router's input, already fake-quantized
USE_TRANSFORMERS = "serve it with transformers instead (`codequant generate DIR`, or from_pretrained after `import codequant`)"


def renamed(name: str, parts) -> str:
    """``name`` with each (old, new) part of ``parts`` replaced."""
    for old, new in parts:
        name = name.replace(old, new)
    return name


def checkpoint_name(name: str) -> str:
    """The checkpoint's name of a vLLM module (Mixtral's ``block_sparse_moe`` is transformers 5's ``mlp``)."""
    return renamed(name, VLLM_TO_CHECKPOINT)


def share_process_cpus() -> None:
    """vLLM's CPU worker pins its model thread (and each OpenMP thread) to one core each, and the
    kernel pool's workers, created from the model thread, would share its core: they get the CPUs
    of all the process's threads instead (once per process)."""
    if cpu_kernels is None or getattr(share_process_cpus, "done", False) or not hasattr(os, "sched_getaffinity"):
        return
    cpus = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            cpus |= os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    cpu_kernels.worker_cpus(cpus)
    share_process_cpus.done = True


def refusal(reason: str) -> CheckpointError:
    return CheckpointError(f"vLLM cannot serve this codequant checkpoint faithfully: {reason}")


def check_weight_files(directory: Path) -> None:
    """Without a weight index vLLM loads every ``*.safetensors`` file of the directory as model weights."""
    if (directory / INDEX_FILE).is_file():
        return
    weights = {f.name for f in weight_files(directory)}
    others = sorted(f.name for f in directory.glob("*.safetensors") if f.name not in weights)
    if others:
        raise CheckpointError(
            f"codequant checkpoint {directory}: vLLM would load {others} as model weights (it reads every *.safetensors "
            f"file of a directory without {INDEX_FILE}); move them out of the checkpoint directory"
        )


def check_servable(qc: CodeQuantConfig, hf_config) -> None:
    """Refuse what the vLLM path has not been verified to run as transformers does."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    unverified = sorted(set(architectures) - set(VERIFIED_ARCHITECTURES))
    if unverified or not architectures:
        raise refusal(
            f"architecture {unverified or architectures} is not verified under vLLM with the codequant method "
            f"(verified: {', '.join(VERIFIED_ARCHITECTURES)}); {USE_TRANSFORMERS}"
        )
    bits = sorted({qc.bits} | {s["bits"] for s in qc.modules.values() if "bits" in s})
    if bits != [VERIFIED_BITS]:
        raise refusal(
            f"its codebooks use {'/'.join(map(str, bits))}-bit indices, and only {VERIFIED_BITS}-bit checkpoints are "
            f"verified under vLLM; {USE_TRANSFORMERS}, or quantize with --wbits {VERIFIED_BITS}"
        )
    rank = getattr(hf_config, "kv_lora_rank", None)
    if rank is not None and current_platform.is_cpu() and rank + hf_config.qk_rope_head_dim != CPU_MLA_LATENT:
        # vLLM itself fails at engine start ("Unsupported block size: 16", "Head dimension 80 is not supported by MLA")
        raise refusal(
            f"its latent attention caches kv_lora_rank {rank} + qk_rope_head_dim {hf_config.qk_rope_head_dim} channels "
            f"per token, and vLLM's CPU MLA decode kernel runs only {CPU_MLA_LATENT} (512 + 64, DeepSeek-V2's); "
            f"{USE_TRANSFORMERS}"
        )


@register_quantization_config(QUANT_METHOD)
class CodeQuantVllmConfig(QuantizationConfig):
    """vLLM's view of a checkpoint's ``quantization_config`` (validated by :class:`CodeQuantConfig`)."""

    def __init__(self, config: CodeQuantConfig):
        super().__init__()
        self.checkpoint = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CodeQuantVllmConfig":
        return cls(CodeQuantConfig.from_dict(dict(config)))

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Check the checkpoint as ``from_pretrained`` does, and refuse what is not verified under vLLM."""
        if not Path(model_name).is_dir():
            raise CheckpointError(
                f"codequant checkpoint {model_name!r}: not a local directory, so its files cannot be verified before vLLM "
                f"loads them; download it first (huggingface-cli download {model_name} --local-dir DIR) and serve DIR"
            )
        verify_checkpoint(model_name)
        check_weight_files(Path(model_name))
        check_servable(self.checkpoint, hf_config)

    def spec(self, name: str) -> dict | None:
        return self.checkpoint.modules.get(checkpoint_name(name))

    def part_names(self, prefix: str) -> list[str]:
        """The checkpoint modules a vLLM layer stacks (``...qkv_proj`` -> q_proj, k_proj, v_proj)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf) or DEFAULT_PACKED_MODULES.get(leaf)
        if parts is None:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            names = self.part_names(prefix)
            specs = [self.spec(n) for n in names]
            if all(s is None for s in specs):
                return UnquantizedLinearMethod()
            if any(s is None for s in specs):
                missing = [n for n, s in zip(names, specs) if s is None]
                raise refusal(f"vLLM merges {names} into {prefix}, but {missing} are not quantized")
            if prefix.endswith(".kv_b_proj"):
                return CodeQuantLatentMethod(names, specs)
            return CodeQuantLinearMethod(names, specs)
        if isinstance(layer, ParallelLMHead):
            spec = self.spec(prefix)
            if spec is not None:
                return CodeQuantLMHeadMethod(prefix, spec)
            return CpuLMHeadMethod() if cpu_kernels is not None else None
        if isinstance(layer, RoutedExperts):
            spec = self.spec(prefix)
            if spec is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return CodeQuantMoEMethod(layer.moe_config, prefix, spec)
        return None


def _act_and_block(names: list[str], specs: list[dict]) -> tuple:
    """The activation spec and Hadamard block shared by all parts of a merged layer."""
    keys = {(json_key(s["act"]), s.get("hadamard_block", 0), s["in_features"], s["group_size"]) for s in specs}
    if len(keys) > 1:
        raise refusal(f"vLLM runs {names} as one layer, but their activation specs, Hadamard blocks or groups differ")
    spec = specs[0]
    return act_from_dict(spec["act"]), int(spec.get("hadamard_block", 0))


def json_key(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def _check_row_split(what: str, k_shard: int, act, hadamard_block: int, world: int) -> None:
    """A K split must leave every activation-quantization group and Hadamard block inside one shard."""
    if world == 1:
        return
    if act.enabled and (act.group_size == 0 or k_shard % act.group_size):
        raise refusal(
            f"{what}: activations are quantized in groups of {act.group_size or 'a whole token'}, which a "
            f"{world}-way tensor-parallel split of its input ({k_shard} channels per rank) would change; "
            "serve it with tensor_parallel_size=1"
        )
    if hadamard_block and k_shard % hadamard_block:
        raise refusal(f"{what}: the online Hadamard block {hadamard_block} does not divide {k_shard} channels per rank")


def register_packed(layer, rows: int, k: int, groups: int, attrs) -> None:
    """Zero ``indices`` [rows, K/2], ``codebook`` [rows, groups, 16] and ``row_sum`` [rows] parameters
    on ``layer``, each with the weight attributes ``attrs(name)``."""
    for name, shape, dtype in (("indices", (rows, padded_columns(k) // 2), torch.uint8),
                               ("codebook", (rows, groups, CODEBOOK_SIZE), CODEBOOK_DTYPE),
                               ("row_sum", (rows,), torch.float32)):
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
        set_weight_attrs(param, attrs(name))
        layer.register_parameter(name, param)


class CodeQuantLinearMethod(LinearMethodBase):
    """y = Q_act(x H) W_hat^T + b on packed weights (``codequant.kernels.linear``).

    Merged layers stack their parts' rows; a row-parallel layer holds a K shard whose row sums
    are recomputed over its columns (see :mod:`codequant.vllm.sharding`)."""

    def __init__(self, names: list[str], specs: list[dict]):
        self.names, self.specs = names, specs
        self.act, self.hadamard_block = _act_and_block(names, specs)
        # a quantized router computes Q_act(x) W_hat^T in float32 (codequant.modules.router): its input is
        # fake-quantized here and the kernel multiplies by W_hat itself (float32 centroids, unquantized input)
        self.router = specs[0]["kind"] == "router"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        k, g = self.specs[0]["in_features"], self.specs[0]["group_size"]
        world = layer.tp_size if isinstance(layer, RowParallelLinear) else 1
        if input_size_per_partition * world != k:
            raise refusal(f"{layer.prefix}: vLLM gives it {input_size} inputs, the checkpoint {k}")
        try:
            k_shard, groups = column_shard_features(k, k // g, world) if world > 1 else (k, k // g)
        except ValueError as err:
            raise refusal(f"{self.names[0]}: {err}") from None
        _check_row_split(self.names[0], k_shard, self.act, self.hadamard_block, world)
        rows = sum(output_partition_sizes)
        layer.cq_in_features, layer.cq_world = k_shard, world
        layer.cq_offsets = [sum(output_partition_sizes[:i]) for i in range(len(output_partition_sizes))]
        layer.cq_sizes = list(output_partition_sizes)
        register_packed(layer, rows, k_shard, groups, lambda name: {"weight_loader": self._loader(layer, name)})

    def _loader(self, layer, part: str):
        column_parallel = isinstance(layer, ColumnParallelLinear) and layer.tp_size > 1

        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
            if part == "row_sum" and layer.cq_world > 1:
                return  # recomputed over the shard's columns after loading
            index = _QKV_SHARDS[shard_id] if isinstance(shard_id, str) else (shard_id or 0)
            size = layer.cq_sizes[index]
            if column_parallel:
                rank = layer.tp_rank
                if isinstance(layer, QKVParallelLinear) and index > 0:
                    rank //= layer.num_kv_head_replicas
                loaded_weight = loaded_weight.narrow(0, rank * size, size)
            if layer.cq_world > 1:
                loaded_weight = column_shard_part(part, loaded_weight, layer.tp_rank, layer.cq_world)
            target = param.data.narrow(0, layer.cq_offsets[index], size)
            if tuple(target.shape) != tuple(loaded_weight.shape):
                raise refusal(f"{layer.prefix}.{part}: checkpoint shard {list(loaded_weight.shape)} does not fit {list(target.shape)}")
            target.copy_(loaded_weight)
        return load

    def process_weights_after_loading(self, layer) -> None:
        share_process_cpus()
        if layer.cq_world > 1:
            layer.row_sum.data.copy_(shard_row_sum(layer.indices.data, layer.codebook.data, layer.cq_in_features))
        layer.cq_weight = PackedWeight(layer.indices, layer.codebook, layer.row_sum, layer.cq_in_features)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.router and self.act.enabled:
            x_hat = fake_quantize_activations(x.float(), self.act)
            return kernels.linear(x_hat, layer.cq_weight, UNQUANTIZED, bias).to(x.dtype)
        return kernels.linear(x, layer.cq_weight, self.act, bias, self.hadamard_block)


class CodeQuantLMHeadMethod(CodeQuantLinearMethod):
    """A packed lm_head (``codequant quantize --quantize-head``): logits = Q_act(x) W_hat^T.

    vLLM's vocabulary-parallel loader gives each rank its rows (``output_dim`` 0) and leaves the
    padding rows zero, whose logits it drops."""

    def __init__(self, prefix: str, spec: dict):
        super().__init__([prefix], [spec])

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        k, g = self.specs[0]["in_features"], self.specs[0]["group_size"]
        if input_size_per_partition != k:
            raise refusal(f"{self.names[0]}: vLLM gives it {input_size_per_partition} inputs, the checkpoint {k}")
        layer.cq_in_features, layer.cq_world = k, 1  # every rank holds whole rows
        register_packed(layer, sum(output_partition_sizes), k, k // g, lambda name: {"output_dim": 0, **extra_weight_attrs})


def kernel_matrix(weight: PackedWeight, act) -> torch.Tensor:
    """The float32 [N, K] matrix W with ``kernels.linear(x, weight, act) = Q_act(x) W^T``: W_hat, or where the
    backend approximates it (the CPU kernels round centroids to int8 under quantized activations) that
    approximation, read off the kernel's outputs for the K unit vectors (each quantizes to one nonzero). The CPU
    kernels compute alike at every batch size; which GPU path runs depends on it (not run under vLLM)."""
    eye = torch.eye(weight.in_features, device=weight.indices.device)
    unit = fake_quantize_activations(eye, act).diagonal()
    return (kernels.linear(eye, weight, act) / unit[:, None]).T.contiguous()


class CodeQuantLatentMethod(CodeQuantLinearMethod):
    """MLA's ``kv_b_proj`` (latent -> keys and values) as a dense matrix: y = x W^T, W from :func:`kernel_matrix`.

    vLLM reads this weight densely to fold it into the query and output at decode, where the
    latents come from its cache, not from this layer's input. Its input transform Q_act(x H) is
    therefore applied by :meth:`transform_latent` to ``kv_a_layernorm``'s output, before the cache
    (``codequant.vllm.models`` installs it), and this layer multiplies by the matrix the kernel would
    use: at prefill and at decode the result is transformers' ``kernels.linear(x, W_hat, act, H)`` up to
    float32 summation order."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        layer.cq_dtype = params_dtype

    def process_weights_after_loading(self, layer) -> None:
        weight = kernel_matrix(PackedWeight(layer.indices, layer.codebook, layer.row_sum, layer.cq_in_features), self.act)
        for name in ("indices", "codebook", "row_sum"):
            delattr(layer, name)
        layer.weight = torch.nn.Parameter(weight.to(layer.cq_dtype), requires_grad=False)

    def transform_latent(self, module, args, latent: torch.Tensor) -> torch.Tensor:
        """Q_act(x H) of ``kv_a_layernorm``'s output x (a forward hook), in x's dtype, as ``kernels.linear`` computes it."""
        x = block_hadamard(latent, self.hadamard_block) if self.hadamard_block else latent
        return fake_quantize_activations(x.float(), self.act).to(latent.dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.weight, bias)


class CpuLMHeadMethod(UnquantizedEmbeddingMethod):
    """The unquantized lm_head on the CPU: bf16 logits of one sequence (:data:`HEAD_ROWS` rows)
    of a head of at least :data:`MIN_HEAD_BYTES` through ``codequant.kernels.cpu.linear_bf16``,
    which reads the weight at 1.1-1.4x the rate of vLLM's oneDNN GEMV; anything else (other
    dtypes, a bias, batches of several sequences, where oneDNN's GEMM is as fast at 2 rows and 3x
    faster at 4 to 8, small heads, other devices) as vLLM computes it (on its prepared weights)."""

    HEAD_ROWS = 1
    MIN_HEAD_BYTES = 64 << 20  # smaller heads (the fixture's 4 MB) decoded faster on vLLM's own GEMV

    def streamed(self, weight: torch.Tensor) -> bool:
        """A head ``linear_bf16`` runs: bf16 on the CPU, of at least :data:`MIN_HEAD_BYTES`."""
        return weight.device.type == "cpu" and weight.dtype is torch.bfloat16 and 2 * weight.numel() >= self.MIN_HEAD_BYTES

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        if self.streamed(layer.weight):
            layer.weight.data = cpu_kernels.huge_page_copy(layer.weight.data)
        share_process_cpus()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (bias is None and x.device.type == "cpu" and x.dtype is torch.bfloat16 and x.dim() == 2
                and x.shape[0] <= self.HEAD_ROWS and self.streamed(layer.weight)):
            return cpu_kernels.linear_bf16(x, layer.weight)
        return super().apply(layer, x, bias)


class CodeQuantMoEMethod(FusedMoEMethodBase):
    """Routed SwiGLU experts on packed stacks (``codequant.kernels.moe``); vLLM routes.

    Tensor parallelism splits the intermediate dimension: gate_up keeps its ranks' gate and up
    rows, down a K shard with recomputed row sums. Expert parallelism is refused."""

    def __init__(self, moe, prefix: str, spec: dict):
        super().__init__(moe)
        self.prefix, self.spec = prefix, spec
        self.act, self.down_act = act_from_dict(spec["act"]), act_from_dict(spec["down_act"])
        self.hadamard_block = int(spec["hadamard_block"])

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        s = self.spec
        e, h, i = s["num_experts"], s["hidden_dim"], s["intermediate_dim"]
        if (num_experts, hidden_size) != (e, h):
            raise refusal(
                f"{self.prefix}: vLLM holds {num_experts} local experts of hidden size {hidden_size}, the checkpoint "
                f"{e} of {h}; expert parallelism is not supported by the codequant method"
            )
        world = i // intermediate_size_per_partition
        ip = intermediate_size_per_partition
        try:
            ks, down_groups = column_shard_features(i, i // s["down_group_size"], world) if world > 1 else (i, i // s["down_group_size"])
        except ValueError as err:
            raise refusal(f"{self.prefix}.down: {err}") from None
        _check_row_split(f"{self.prefix}.down", ks, self.down_act, self.hadamard_block, world)
        layer.cq_world, layer.cq_rank = world, (layer.moe_config.moe_parallel_config.tp_rank if world > 1 else 0)
        layer.cq_intermediate = ip
        shapes = {
            "gate_up_indices": ((e, 2 * ip, padded_columns(h) // 2), torch.uint8),
            "gate_up_codebook": ((e, 2 * ip, h // s["group_size"], CODEBOOK_SIZE), CODEBOOK_DTYPE),
            "gate_up_row_sum": ((e, 2 * ip), torch.float32),
            "down_indices": ((e, h, padded_columns(ip) // 2), torch.uint8),
            "down_codebook": ((e, h, down_groups, CODEBOOK_SIZE), CODEBOOK_DTYPE),
            "down_row_sum": ((e, h), torch.float32),
        }
        for name, (shape, dtype) in shapes.items():
            layer.register_parameter(name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
        # RoutedExperts' own loader maps per-expert weight/scale names; the packed stacks load by name
        layer.load_weights = lambda weights: self._load(layer, weights)

    def _load(self, layer, weights):
        for name, loaded in weights:
            param = getattr(layer, name, None)
            if not isinstance(param, torch.nn.Parameter) or not name.startswith(("gate_up_", "down_")):
                raise refusal(f"{self.prefix}: unexpected checkpoint tensor {name!r} for packed experts")
            if layer.cq_world > 1 and name.startswith("gate_up_"):
                gate, up = loaded.chunk(2, dim=1)
                loaded = torch.cat([row_slice(gate, layer.cq_rank, layer.cq_world, 1),
                                    row_slice(up, layer.cq_rank, layer.cq_world, 1)], dim=1)
            elif layer.cq_world > 1 and name in ("down_indices", "down_codebook"):
                loaded = column_shard_part(name.removeprefix("down_"), loaded, layer.cq_rank, layer.cq_world)
            if name != "down_row_sum" or layer.cq_world == 1:
                if tuple(param.shape) != tuple(loaded.shape):
                    raise refusal(f"{self.prefix}.{name}: checkpoint shape {list(loaded.shape)} does not fit {list(param.shape)}")
                param.data.copy_(loaded)
            yield name

    def process_weights_after_loading(self, layer) -> None:
        share_process_cpus()
        if layer.cq_world > 1:
            layer.down_row_sum.data.copy_(shard_row_sum(layer.down_indices.data, layer.down_codebook.data, layer.cq_intermediate))
        layer.cq_gate_up = PackedWeight(layer.gate_up_indices, layer.gate_up_codebook, layer.gate_up_row_sum, self.spec["hidden_dim"])
        layer.cq_down = PackedWeight(layer.down_indices, layer.down_codebook, layer.down_row_sum, layer.cq_intermediate)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return kernels.moe(x, topk_ids, topk_weights, layer.cq_gate_up, layer.cq_down, self.act, self.down_act, self.hadamard_block)


def quantize_plain_linears(model: torch.nn.Module, config: CodeQuantVllmConfig) -> None:
    """Give the checkpoint's quantized routers and gates the codequant method where vLLM builds them unquantized.

    Mixtral, Qwen2-MoE and OLMoE build their router (and Qwen2-MoE its ``shared_expert_gate``) with
    ``quant_config=None``; the checkpoint quantizes them (``Q_act(x) W_hat^T``, as transformers runs
    them). Each such layer is rebuilt, before any weight loads, as the same class with this config,
    and every reference to it (Qwen2-MoE's shared expert holds its gate) is pointed at the new one."""
    swaps = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or not isinstance(module.quant_method, UnquantizedLinearMethod):
            continue
        if config.spec(module.prefix) is None:
            continue
        if type(module) not in (ReplicatedLinear, GateLinear) or module.has_bias:
            raise refusal(f"vLLM builds {module.prefix} ({type(module).__name__}) unquantized, the checkpoint quantizes it")
        if id(module) in swaps:
            continue
        if isinstance(module, GateLinear):
            new = GateLinear(module.input_size, module.output_size, bias=False, out_dtype=module.out_dtype,
                             params_dtype=module.params_dtype, quant_config=config, prefix=module.prefix,
                             return_bias=module.return_bias)
        else:
            new = ReplicatedLinear(module.input_size, module.output_size, bias=False, skip_bias_add=module.skip_bias_add,
                                   params_dtype=module.params_dtype, quant_config=config, prefix=module.prefix,
                                   return_bias=module.return_bias)
        swaps[id(module)] = new
    if not swaps:
        return
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])
