"""QuantConfig: one small dataclass for a quantization run, with the paper's defaults.

Load from YAML or TOML with :meth:`QuantConfig.from_file`; unknown keys are errors.
``method`` picks the recipe; the stages each method runs are in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


def _has_type(value, expected) -> bool:
    """isinstance for the annotations QuantConfig uses (bool is not an int; an int is a float)."""
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, expected)


def _type_name(expected) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(expected, expected.__name__)


@dataclass(frozen=True)
class Recipe:
    """Which stages a method runs."""

    rotation: str  # R1, a key of calibration.rotations.R1_ROTATIONS: "none" | "hadamard" (random Hadamard) | "learned" (AOS)
    weights: str  # a key of quantizers.registry.WEIGHT_QUANTIZERS: "codebook" (k-means) | "rtn" (uniform grid) | "gptq"
    finetune: bool  # ACCF centroid fine-tuning
    permute: bool  # POG (only matters when group_size < row length)


METHODS: dict[str, Recipe] = {
    "rtn": Recipe("none", "rtn", False, False),
    "quarot": Recipe("hadamard", "rtn", False, False),
    "spinquant": Recipe("learned", "rtn", False, False),
    "gptq": Recipe("hadamard", "gptq", False, False),
    "kmeans": Recipe("learned", "codebook", False, True),
    "codequant": Recipe("learned", "codebook", True, True),
}

ASSIGNMENTS = ("nearest", "feedback")
DEFAULT_TARGETS = ("attention", "router", "experts", "shared_experts", "dense_mlp")
# "lm_head": the output head as a weight-only codebook linear (wbits, activations unquantized); off by default
TARGET_KINDS = (*DEFAULT_TARGETS, "lm_head")


@dataclass
class QuantConfig:
    """A CodeQuant run. Defaults follow the paper: W4 with 16 centroids per row, per-token
    asymmetric A4, learned rotation (AOS), POG when grouped, ACCF for a few epochs."""

    method: str = "codequant"
    wbits: int = 4
    abits: int = 4
    group_size: int | None = None  # None: one codebook per row
    act_group_size: int = 0  # 0: one scale per token
    act_clip: float = 1.0
    act_clip_search: bool = False  # each module's clip ratio searched on calibration data for the least output error (calibration/act_clip.py); act_clip unused
    online_hadamard: bool = True  # block Hadamard before every down projection (when abits < 16)
    o_proj_hadamard: bool = False  # block Hadamard before every attention output projection too (when abits < 16)
    router_abits: int | None = None  # bits of the router's input (None: abits); a mixed-precision choice: the router is about 0.5% of an MoE layer's multiply-adds per token
    value_rotation: bool = False  # per-head Hadamard R2 between v_proj and o_proj
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # calibration
    calib: str | None = None  # file, directory or HF dataset; None: text sampled from the model
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    max_gpu_memory: float | None = None  # GiB the device may use (None: no cap); refused up front when below one layer's need
    stream: bool = False  # read each decoder layer from disk when its turn comes (directory / hub sources); False: load the whole model first
    calibrate_all_experts: bool = True  # experts no calibration token is routed to take statistics (k-means weights, Hessians) from every token
    # stage 1: AOS
    rotation_steps: int = 400
    rotation_lr: float = 1e-2
    rotation_tokens: int = 2048  # sampled tokens per norm output
    # stage 3: codebooks and ACCF
    kmeans_iters: int = 20
    weight_assignment: str = "nearest"  # "nearest" (k-means) | "feedback" (Hessian error feedback, quantizers/feedback.py; lower KL on the fixture, not yet checked on held-out models)
    feedback_alternations: int = 2  # walk + centroid refit rounds of the feedback assignment
    accf_epochs: int = 3
    accf_lr: float = 1e-4
    accf_batch_tokens: int = 4096
    router_kl_weight: float = 1.0
    # block-output tuning (calibration/layer_tuning.py): every codebook of a quantized decoder layer
    # tuned together against the full-precision layer's output; 0 epochs: off
    block_tuning_epochs: int = 0
    block_tuning_lr: float = 1e-4

    def __post_init__(self):
        self.check_types(dataclasses.asdict(self), "QuantConfig")
        self.targets = tuple(self.targets)
        self.validate()

    @property
    def recipe(self) -> Recipe:
        return METHODS[self.method]

    @classmethod
    def check_types(cls, options: dict, source: str) -> None:
        """One message per option whose value has the wrong type (name, expected type, value)."""
        hints = typing.get_type_hints(cls)
        bad = [
            f"option {name} must be {_type_name(hints[name])}, got {type(value).__name__} {value!r}"
            for name, value in options.items()
            if name in hints and not _has_type(value, hints[name])
        ]
        if bad:
            raise ValueError(f"{source}: " + "; ".join(bad))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 2 <= self.wbits <= 4:
            raise ValueError(f"--wbits must be between 2 and 4 (codebooks of 4 to 16 centroids), got {self.wbits}")
        if not (2 <= self.abits <= 8 or self.abits == 16):
            raise ValueError(f"--abits must be between 2 and 8, or 16 for no activation quantization, got {self.abits}")
        if self.act_clip_search and self.act_clip != 1.0:
            raise ValueError(f"--act-clip {self.act_clip} and --act-clip-search exclude each other: the search picks every module's clip ratio")
        if self.router_abits is not None and not (2 <= self.router_abits <= 8 or self.router_abits == 16):
            raise ValueError(f"--router-abits must be between 2 and 8, or 16 for an unquantized router input, got {self.router_abits}")
        if not 0 < self.act_clip <= 1:
            raise ValueError(f"--act-clip must be in (0, 1]: the share of each token's range that activations are quantized over, got {self.act_clip}")
        if self.act_group_size < 0:
            raise ValueError(f"--act-group-size must be a positive number of channels, or 0 for one scale per token, got {self.act_group_size}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"--group-size must be a positive number of columns, got {self.group_size}")
        if self.weight_assignment not in ASSIGNMENTS:
            raise ValueError(f"unknown weight_assignment {self.weight_assignment!r}; choose one of: {', '.join(ASSIGNMENTS)}")
        if self.feedback_alternations < 1:
            raise ValueError(f"feedback_alternations must be at least 1, got {self.feedback_alternations}")
        if self.block_tuning_epochs < 0:
            raise ValueError(f"--block-tuning-epochs must be 0 (off) or a positive number of epochs, got {self.block_tuning_epochs}")
        if not self.block_tuning_lr > 0:
            raise ValueError(f"block_tuning_lr must be a positive learning rate, got {self.block_tuning_lr}")
        unknown = set(self.targets) - set(TARGET_KINDS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; choose from: {', '.join(TARGET_KINDS)}")
        if self.max_gpu_memory is not None and not self.max_gpu_memory > 0:
            raise ValueError(f"--max-gpu-memory must be a positive number of GiB, got {self.max_gpu_memory}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"need at least one calibration sample of 2 tokens, got nsamples={self.nsamples} seqlen={self.seqlen}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "QuantConfig":
        """Read a YAML (.yaml/.yml) or TOML (.toml) file; keyword overrides win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of option names to values")
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; valid options: {', '.join(sorted(names))}")
        cls.check_types(data, source)
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    def fingerprint(self) -> str:
        """Stable text identifying every setting that changes the result (for resume)."""
        d = self.to_dict()
        d.pop("device")
        d.pop("max_gpu_memory")  # changes batching, not the result
        d.pop("stream")  # changes where the weights wait, not the result
        return json.dumps(d, sort_keys=True)
