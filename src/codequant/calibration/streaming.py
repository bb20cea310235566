"""Weights streamed from disk: the model skeleton on the meta device, one decoder layer in memory.

:class:`StreamedModel` builds the ``*ForCausalLM`` without allocating weights and reads a
decoder layer's tensors from the safetensors shards (memory-mapped, opened only while that
layer loads) when the driver asks for it; :meth:`StreamedModel.release` returns the layer to
the meta device. Checkpoint names go through transformers' own conversion mapping (renames,
per-expert tensors fused into ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj``
[E, H, I]), so a layer holds exactly what ``from_pretrained`` would give it. The embedding,
final norm and lm_head (everything outside the decoder layers) load with :meth:`load_globals`.

Host memory: the skeleton, the global tensors and the layers in memory at the time. glibc
raises its mmap threshold each time a large block is freed (up to 32 MiB), after which freed
layers stay in the heap, fragment it and the resident set grows with depth; a streamed run
therefore fixes the threshold at 1 MiB (:func:`return_freed_memory`), so every tensor larger
than that goes back to the system when freed.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..adapters import ArchitectureAdapter, get_adapter
from ..io.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, weight_files

log = logging.getLogger("codequant")


MMAP_THRESHOLD = 2**20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def return_freed_memory() -> bool:
    """Make glibc serve (and give back) every allocation above MMAP_THRESHOLD with its own
    mapping; False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def resolve_model_dir(name_or_path: str) -> Path:
    """The local directory of a model: the path itself, or a hub id's snapshot in the hub cache
    (config, weights and tokenizer files are fetched there when missing)."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _weight_files(directory: Path) -> list[Path]:
    try:
        return weight_files(directory)
    except CheckpointError:
        raise FileNotFoundError(
            f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}: weights can be streamed only from safetensors; "
            "convert the checkpoint to safetensors or leave out --stream"
        ) from None


class StreamedModel:
    """A model whose decoder layers live on disk until :meth:`load` (see the module doc)."""

    def __init__(self, directory: str | Path, dtype: torch.dtype):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.directory, self.dtype = Path(directory), dtype
        return_freed_memory()
        config = AutoConfig.from_pretrained(str(self.directory))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.model.codequant_source_dtype = config.dtype or dtype
        self.adapter: ArchitectureAdapter = get_adapter(self.model)
        self._real_buffers()
        self.mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        expected = self.model.state_dict()
        layer_of = re.compile(re.escape(self.adapter.layer_name(0)[:-1]) + r"(\d+)\.")
        # {layer index or None (outside the layers): {file: [checkpoint keys]}}
        self.keys: dict[int | None, dict[Path, list[str]]] = defaultdict(lambda: defaultdict(list))
        for f in _weight_files(self.directory):
            with safe_open(str(f), "pt") as handle:
                for key in handle.keys():
                    target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, expected)
                    match = layer_of.match(target)
                    self.keys[int(match.group(1)) if match else None][f].append(key)
        self.loaded: set[int] = set()
        self.pristine = [copy.deepcopy(layer) for layer in self.adapter.layers(self.model)]  # meta: no storage

    def _real_buffers(self) -> None:
        """Non-persistent buffers (rotary inv_freq) are computed, not stored: rebuild their module on the CPU."""
        rotary = self.adapter.rotary_emb(self.model)
        decoder = self.adapter.decoder(self.model)
        setattr(decoder, self.adapter.layout.rotary_emb, type(rotary)(config=self.model.config))
        left = [name for name, b in self.model.named_buffers() if b.is_meta]
        if left:
            raise NotImplementedError(f"buffers {left} of {type(self.model).__name__} cannot be rebuilt for streaming; leave out --stream")

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    def _read(self, part: int | None) -> None:
        """Read the tensors of ``part`` (a layer index, or None: everything outside the layers)
        through transformers' conversion mapping into the skeleton, on the CPU in ``dtype``."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        handles = [safe_open(str(f), "pt") for f in self.keys[part]]
        try:
            state = {key: h.get_slice(key) for h, keys in zip(handles, self.keys[part].values()) for key in keys}
            load_config = LoadStateDictConfig(dtype=self.dtype, device_map={"": "cpu"}, weight_mapping=self.mapping)
            info, _ = convert_and_load_state_dict_in_model(self.model, state, load_config)
        finally:
            del handles  # unmap the files: pages read stay out of this process's resident set
        if part is None and getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()  # lm_head shares the embedding read just now
        module = self.adapter.layers(self.model)[part] if part is not None else self.model
        missing = [name for name, p in module.named_parameters() if p.is_meta]
        if part is None:
            missing = [n for n in missing if not n.startswith(self.adapter.layer_name(0)[:-1])]
        if missing or info.conversion_errors:
            what = f"decoder layer {part}" if part is not None else "the model outside its layers"
            raise ValueError(
                f"{self.directory}: {what} has no weights on disk for {missing[:8]} {info.conversion_errors or ''}; "
                "the weight files do not match config.json (re-download or re-save the model)"
            )

    def load_globals(self) -> None:
        """Read the embedding, final norm, lm_head and any other tensor outside the layers (lm_head
        tied to the embedding where the config says so)."""
        self._read(None)

    def load(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights read from disk (in ``dtype``, on the CPU)."""
        if i not in self.loaded:
            self._read(i)
            self.loaded.add(i)
        return self.adapter.layers(self.model)[i]

    def release(self, i: int, reset: bool) -> None:
        """Free decoder layer ``i``. ``reset``: put back the layer as built (it will be read again;
        modules a transform replaced, such as folded LayerNorms, must be the checkpoint's again);
        else keep its modules (quantized ones included) with their tensors on the meta device."""
        layers = self.adapter.layers(self.model)
        if reset:
            layers[i] = copy.deepcopy(self.pristine[i])
        else:
            layers[i].to("meta")
        self.loaded.discard(i)
