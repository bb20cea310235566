"""Model loading and device choice."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import SUPPORTED_ARCHITECTURES


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


def open_model(name_or_path: str, dtype: torch.dtype, stream: bool):
    """(model, tokenizer, streamed): the whole model on the CPU (streamed None), or with ``stream``
    a :class:`~.streaming.StreamedModel` holding only the layers outside the decoder stack."""
    if not stream:
        return (*load_model(name_or_path, dtype), None)
    from transformers import AutoTokenizer

    from .streaming import StreamedModel, resolve_model_dir

    directory = resolve_model_dir(check_source(name_or_path))
    streamed = StreamedModel(directory, dtype)
    streamed.load_globals()
    return streamed.model, AutoTokenizer.from_pretrained(str(directory)), streamed
