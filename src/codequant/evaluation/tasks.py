"""Zero-shot multiple-choice accuracy (ARC-Easy, PIQA, WinoGrande) on local task files.

The scorer follows lm-evaluation-harness (0.4.x, ``--model hf``, zero-shot) so the numbers
agree with ``lm_eval --tasks codequant_arc_easy,...`` on the task configs shipped in
``lm_eval_tasks/``:

* ARC-Easy, PIQA (``{"query", "choices", "gold"}``): context ``query.strip() + "\\nAnswer:"``
  (the files hold ``"Question: ..."``, PIQA with a trailing newline), continuation
  ``" " + choice`` (lm-eval's target delimiter). ``acc`` takes the choice of highest
  log-likelihood; ``acc_norm`` divides each log-likelihood by the choice's length in
  characters first (lm-eval's ``acc_norm``; for these ASCII files that is the byte length).
* WinoGrande (``{"context_options", "continuation", "gold"}``): partial scoring; the same
  continuation ``" " + continuation`` is scored after each context option; ``acc`` only (the
  continuation is the same for both options, so there is nothing to normalize).

Tokenization as lm-eval's ``HFLM``: trailing spaces of the context move to the continuation,
``whole = encode(context + continuation)``, ``context = encode(context)``, the continuation
tokens are ``whole[len(context):]``; ``encode`` uses the tokenizer's default special tokens
(so a BOS is added where the tokenizer adds one). Sequences longer than the model's maximum
length keep their last tokens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TASK_FILES = {"arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl", "winogrande": "winogrande.jsonl"}
LM_EVAL_TASKS = {name: f"codequant_{name}" for name in TASK_FILES}  # our lm-eval task names
DEFAULT_DATA_DIR = "../shared/data/tasks"  # relative to the project root (the usual working directory)
TARGET_DELIMITER = " "
_TASK_DIR = Path(__file__).with_name("lm_eval_tasks")


def default_data_dir() -> Path:
    """``$CODEQUANT_TASK_DATA``, else ``../shared/data/tasks`` from the working directory, else from the repository root."""
    env = os.environ.get("CODEQUANT_TASK_DATA")
    if env:
        return Path(env)
    here = Path(DEFAULT_DATA_DIR)
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[3] / DEFAULT_DATA_DIR


@dataclass(frozen=True)
class Request:
    doc: int
    context: str
    continuation: str


def load_docs(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    if task not in TASK_FILES:
        raise ValueError(f"unknown task {task!r}; available: {sorted(TASK_FILES)}")
    path = Path(data_dir or default_data_dir()) / TASK_FILES[task]
    if not path.exists():
        raise FileNotFoundError(f"task file {path} not found (set data_dir or CODEQUANT_TASK_DATA)")
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
                if limit is not None and len(docs) >= limit:
                    break
    return docs


def build_requests(task: str, docs: list[dict]) -> list[Request]:
    """One (context, continuation) per choice of every document, in document order."""
    out = []
    for i, doc in enumerate(docs):
        if task == "winogrande":
            out += [Request(i, ctx, TARGET_DELIMITER + doc["continuation"]) for ctx in doc["context_options"]]
        else:
            context = doc["query"].strip() + "\nAnswer:"
            out += [Request(i, context, TARGET_DELIMITER + choice) for choice in doc["choices"]]
    return out


def _encode(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) exactly as lm-eval's causal ``_encode_pair``."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return 2048


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[Request], batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """sum_t log p(continuation_t | context, continuation_<t) for every request."""
    max_length = max_length or _max_length(model)
    device = next(model.parameters()).device
    items = []
    for r in requests:
        ctx, cont = encode_pair(tokenizer, r.context, r.continuation)
        if not cont:
            raise ValueError(f"empty continuation for context {r.context[-40:]!r}")
        tokens = (ctx + cont)[-(max_length + 1):][:-1]
        items.append((tokens, cont))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out = [0.0] * len(items)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(items[i][0]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens = items[i][0]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            tokens, cont = items[i]
            n, m = len(tokens), len(cont)
            logp = F.log_softmax(logits[row, n - m:n].float(), dim=-1)
            out[i] = float(logp.gather(-1, torch.tensor(cont, device=logp.device)[:, None]).sum())
    return out


def _stderr(hits: list[float]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def score_task(task: str, docs: list[dict], lls: list[float]) -> dict:
    """acc (and acc_norm for choice tasks) from per-request log-likelihoods in build_requests order."""
    acc, acc_norm, k = [], [], 0
    for doc in docs:
        if task == "winogrande":
            n = len(doc["context_options"])
            scores = lls[k:k + n]
            acc.append(float(max(range(n), key=scores.__getitem__) == doc["gold"]))
        else:
            n = len(doc["choices"])
            scores = lls[k:k + n]
            norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
            acc.append(float(_argmax(scores) == doc["gold"]))
            acc_norm.append(float(_argmax(norm) == doc["gold"]))
        k += n
    result = {"acc": sum(acc) / len(acc), "acc_stderr": _stderr(acc)}
    if acc_norm:
        result.update(acc_norm=sum(acc_norm) / len(acc_norm), acc_norm_stderr=_stderr(acc_norm))
    result["n"] = len(docs)
    return result


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum, as numpy.argmax


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict]:
    """{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n"}} on the local task files.

    ``data_dir`` defaults to :func:`default_data_dir`; ``limit`` takes the first documents of
    each file (as lm-eval's ``--limit``).
    """
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            docs = load_docs(task, data_dir, limit)
            lls = loglikelihoods(model, tokenizer, build_requests(task, docs), batch_size)
            results[task] = score_task(task, docs, lls)
            logger.info("%s: %s", task, results[task])
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness


def lm_eval_include_path(data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> str:
    """A directory of lm-eval task configs (``codequant_arc_easy``, ``codequant_piqa``, ``codequant_winogrande``).

    The shipped configs read ``../shared/data/tasks/*.jsonl`` relative to the working
    directory. When ``data_dir`` (or :func:`default_data_dir`) is elsewhere, copies whose
    ``data_files`` hold absolute paths into ``data_dir`` are written to ``out_dir`` (default:
    a directory under the system temp dir named after ``data_dir``) and that directory is
    returned. Pass the result to ``lm_eval --include_path`` or ``TaskManager(include_path=...)``.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir.resolve() == Path(DEFAULT_DATA_DIR).resolve() and out_dir is None:
        return str(_TASK_DIR)
    data_dir = data_dir.resolve()
    if out_dir is None:
        import hashlib
        import tempfile

        tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
        out_dir = Path(tempfile.gettempdir()) / f"codequant_lm_eval_tasks_{tag}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, filename in TASK_FILES.items():
        text = (_TASK_DIR / f"{LM_EVAL_TASKS[task]}.yaml").read_text()
        old = f"test: {DEFAULT_DATA_DIR}/{filename}"
        if old not in text:
            raise RuntimeError(f"{LM_EVAL_TASKS[task]}.yaml does not read {old}")
        new = f"test: {json.dumps(str(data_dir / filename))}"
        (out_dir / f"{LM_EVAL_TASKS[task]}.yaml").write_text(text.replace(old, new))
    return str(out_dir)


def run_lm_eval(
    model_dir: str | os.PathLike,
    tasks: list[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    model_args: str = "",
) -> dict:
    """lm-eval's ``simple_evaluate`` (``--model hf``) on a checkpoint directory with our task configs.

    ``tasks`` are our short names (``arc_easy``, ...) or lm-eval task names. Returns lm-eval's
    results dict (``results[task]["acc,none"]``, ...). Needs the ``eval`` extra (lm-eval).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'codequant[eval]'") from err
    manager = TaskManager(include_path=lm_eval_include_path(data_dir), include_defaults=False)
    names = [LM_EVAL_TASKS.get(t, t) for t in tasks]
    args = f"pretrained={model_dir}" + (f",{model_args}" if model_args else "")
    return lm_eval.simple_evaluate(
        model="hf", model_args=args, tasks=names, limit=limit, batch_size=batch_size, device=device,
        task_manager=manager, log_samples=True,
    )


def lm_eval_main(argv: list[str] | None = None) -> None:
    """``lm_eval`` with codequant imported (so ``--model hf --model_args pretrained=DIR`` loads
    CodeQuant checkpoints) and our task configs on the include path unless one is given."""
    import codequant  # noqa: F401  registers the quantizer with transformers
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", lm_eval_include_path()]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_main()
