"""Text for calibration and evaluation.

A data source is one of:
  * a local file: ``.txt`` (the whole file), ``.jsonl`` or ``.jsonl.gz`` (the ``text`` field of each row);
  * a local directory: every such file in it, in name order;
  * ``heldout:CORPUS_DIR``: the documents a fixture model held out of training (its
    ``training.json`` lists file names and row numbers in CORPUS_DIR);
  * anything else: a Hugging Face dataset, ``name[:config[:split]]`` (needs ``datasets``).
With no source at all, calibration uses text sampled from the full-precision model
(:func:`sample_from_model`), a data-free technique.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import torch

from ..config import QuantConfig
from ..utils import atomic_save_tensors

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


def _read_file(path: Path) -> list[str]:
    if path.name.endswith(".txt"):
        return [path.read_text(encoding="utf-8")]
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field ({e})") from None
    return texts


def _heldout(corpus: Path, model_dir: str | Path | None) -> list[str]:
    record = Path(model_dir or "") / "training.json"
    if not record.is_file():
        raise FileNotFoundError(f"'heldout:' data needs the model's training.json, not found at {record}")
    wanted: dict[str, set[int]] = {}
    for doc in json.loads(record.read_text())["heldout_documents"]:
        wanted.setdefault(doc["file"], set()).add(doc["row"])
    texts = []
    for name, rows in sorted(wanted.items()):
        path = corpus / name
        if not path.is_file():
            raise FileNotFoundError(f"held-out corpus file {path} not found; pass heldout:DIR with the training corpus")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for i, line in enumerate(f) if i in rows]
    return texts


def load_texts(source: str, model_dir: str | Path | None = None) -> list[str]:
    """The documents of a data source (see the module doc), in a deterministic order."""
    if source.startswith("heldout:"):
        texts = _heldout(Path(source[len("heldout:"):]), model_dir)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith(TEXT_SUFFIXES))
            if not files:
                raise ValueError(f"data directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
            texts = [t for p in files for t in _read_file(p)]
        elif path.is_file():
            texts = _read_file(path)
        elif source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(TEXT_SUFFIXES + (".json",)):
            raise FileNotFoundError(f"data file {source} does not exist")
        else:
            texts = _load_hf_dataset(source)
    if not any(t and t.strip() for t in texts):
        raise ValueError(f"data source {source} is empty: it holds no text; give a file with text in it")
    return texts


def _load_hf_dataset(spec: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{spec!r} is neither a local file nor directory, and the 'datasets' package needed to load it "
            "from the Hugging Face Hub is not installed (pip install datasets)"
        ) from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as err:  # offline, unknown name, no "text" column: the hub's many error types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"could not load the dataset {spec!r} from the Hugging Face Hub ({reason}); "
            "without network access, pass a local text or JSONL file or directory"
        ) from None
    return list(ds["text"])


def tokenize_joined(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long token stream of the texts joined by blank lines (WikiText convention)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def calibration_windows(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token windows at seeded random offsets of the joined stream."""
    ids = tokenize_joined(tokenizer, texts)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}; give more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, texts: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, seqlen] windows of the joined stream, from its start."""
    ids = tokenize_joined(tokenizer, texts)
    n = len(ids) // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}; use a smaller --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def sample_from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """[nsamples, seqlen] tokens sampled (temperature 1) from the model, starting at BOS/EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    for b in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - b)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        seq = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen, min_new_tokens=seqlen,
            pad_token_id=start, eos_token_id=None,
        )
        out.append(seq[:, 1 : seqlen + 1].cpu())
    return torch.cat(out)


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
