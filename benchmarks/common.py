"""What the benchmarks share: model shapes, the one Qwen3-30B-A3B config, random models and
packed weights, module swapping through the architecture adapter, timing, bandwidth probes
and the idle-machine checks of the CPU benchmarks.

torch and transformers are imported inside the functions that need them: bench_vllm's parent
process and bench_quantize_memory's parent import this module without them.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "models" / "codequant-moe-tiny"

SHAPES = {  # the published configs, fields that set tensor shapes and routing
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_hidden_layers=48, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
    "mixtral_8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                         tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768),
    "deepseek_v2_lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=16,
                             num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             first_k_dense_replace=1, num_hidden_layers=27, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen3_moe_small": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=32000, hidden_size=1024, intermediate_size=3072,
                            moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                            num_hidden_layers=48, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960),
}
QWEN3_30B_A3B = "qwen3_30b_a3b"
ACT_BITS = {"w4a16": 16, "w4a8": 8, "w4a4": 4}  # CodeQuant modes: activation bits (weights: 4)

LLC_BYTES = 32 << 20  # last-level cache of the CPU benchmark machine
L2_BYTES = 50 << 20  # L2 of the H100 / H200


def command_line(name: str, argv: list[str]) -> str:
    """The command that ran benchmark ``name`` with ``argv``, for the results files."""
    return shlex.join(["python", "-m", "benchmarks", name, *argv])


def full_layers(shape: str) -> int:
    """Decoder layers of the published model."""
    return SHAPES[shape]["num_hidden_layers"]


def moe_dims(shape: str) -> tuple[int, int, int, int, int]:
    """(routed experts, top-k, hidden, expert width, shared experts) of a published config."""
    f = SHAPES[shape]
    experts = f.get("num_experts") or f.get("num_local_experts") or f["n_routed_experts"]
    return experts, f["num_experts_per_tok"], f["hidden_size"], f.get("moe_intermediate_size", f["intermediate_size"]), f.get("n_shared_experts", 0)


def model_config(shape: str, layers: int, **overrides):
    """The transformers config of a published shape cut to ``layers`` decoder layers, with
    ``overrides`` of its fields (e.g. ``vocab_size``)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape]) | overrides
    fields.pop("num_hidden_layers")
    return AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=layers, **fields)


# ---------------------------------------------------------------- random models and weights

def random_model(config, device: str = "cpu", targets_on_meta: bool = False):
    """A bf16 ``*ForCausalLM`` of ``config`` with transformers' random init on ``device``.

    ``targets_on_meta``: the weights :func:`install_codequant` replaces (attention linears and
    experts) stay on the meta device and everything else is random (norm scales 1), so that
    a deep model fits in memory when only its CodeQuant variants run."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from codequant.adapters import get_adapter

    torch.manual_seed(0)
    if not targets_on_meta:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    adapter = get_adapter(model)
    rotary = adapter.rotary_emb(model)
    with torch.device(device):
        setattr(adapter.decoder(model), adapter.layout.rotary_emb, type(rotary)(config=config))
    replaced = {id(p) for _, target in codequant_targets(model) for p in target.module.parameters()}
    for name, p in model.named_parameters():
        if id(p) in replaced:
            continue
        init = torch.ones(p.shape) if p.dim() == 1 else 0.02 * torch.randn(p.shape)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(init.to(device, torch.bfloat16), requires_grad=False))
    return model


def write_random_model(shape: str, layers: int, path: Path) -> None:
    """A random bf16 model of ``shape`` with ``layers`` decoder layers saved at ``path`` (kept
    when already there), with the fixture's tokenizer files (loading asks for a tokenizer)."""
    import shutil

    import torch

    if (path / "config.json").is_file():
        return
    model = random_model(model_config(shape, layers), "cuda" if torch.cuda.is_available() else "cpu")
    for p in model.parameters():
        if p.dim() == 1:  # norm scales: random around 1
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.02)
    model.to("cpu").save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, path / name)


def random_packed(lead: tuple, n: int, k: int, device, generator=None):
    """Random 4-bit indices and fp16 codebooks (one per row) of an N x K weight with leading
    dims ``lead``; row sums are their expected value. Speed does not depend on the values."""
    import torch

    from codequant.core.format import PackedWeight, padded_columns

    idx = torch.randint(0, 256, (*lead, n, padded_columns(k) // 2), dtype=torch.uint8, device=device, generator=generator)
    codebook = (0.02 * torch.randn(*lead, n, 1, 16, device=device, generator=generator)).half()
    return PackedWeight(idx, codebook, codebook.float().sum((-1, -2)) * (k / 16), k)


def codequant_targets(model):
    """Yields (decoder layer, adapter QuantTarget) of every weight the benchmarks run on
    CodeQuant kernels: the attention linears and the routed experts (routers, dense MLPs,
    embeddings, norms and lm_head stay as they are). Layer by layer, so that a caller
    replacing them holds the replaced modules of one layer at a time."""
    from codequant.adapters import get_adapter

    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        attention = {id(m) for m in adapter.attention(layer).modules()}
        for t in adapter.quant_targets(layer):
            if t.kind == "experts" or (t.kind == "linear" and id(t.module) in attention):
                yield layer, t


def install_codequant(model, act, packed) -> None:
    """Replace every :func:`codequant_targets` module of ``model`` in place by a CodeQuant
    module; ``packed(weight)`` gives the PackedWeight of a [.., N, K] weight tensor (which may
    be on the meta device)."""
    from codequant.modules.experts import CodeQuantExperts
    from codequant.modules.linear import CodeQuantLinear

    for layer, t in codequant_targets(model):
        m = t.module
        if t.kind == "experts":
            new = CodeQuantExperts.from_packed(packed(m.gate_up_proj), packed(m.down_proj), act)
        else:
            new = CodeQuantLinear.from_packed(packed(m.weight), None if m.bias is None else m.bias.data, act=act)
        layer.set_submodule(t.name, new)


def set_online_hadamard(model, down: bool, o_proj: bool = False) -> None:
    """The online block Hadamard blocks of ``codequant quantize`` on a model of CodeQuant modules:
    before every down projection, routed experts' and dense (``down``: what quantize does when
    activations are quantized), and before every o_proj (``o_proj``: ``--o-proj-hadamard``);
    block = the largest power of two dividing the input width, 0: none."""
    from codequant.adapters import get_adapter
    from codequant.core.hadamard import largest_power_of_two_block
    from codequant.modules.experts import CodeQuantExperts
    from codequant.modules.linear import CodeQuantLinear

    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        for name, m in layer.named_modules():
            if isinstance(m, CodeQuantExperts):
                m.hadamard_block = largest_power_of_two_block(m.intermediate_dim) if down else 0
            elif isinstance(m, CodeQuantLinear) and name.endswith("down_proj"):
                m.hadamard_block = largest_power_of_two_block(m.in_features) if down else 0
        o = layer.get_submodule(f"{adapter.layout.attention}.{adapter.layout.attention_writer}")
        o.hadamard_block = largest_power_of_two_block(o.in_features) if o_proj else 0


def random_packed_on(device: str):
    """``packed`` for :func:`install_codequant`: random packed weights of each weight's shape on ``device``."""
    return lambda weight: random_packed(tuple(weight.shape[:-2]), *weight.shape[-2:], device)


# ---------------------------------------------------------------- timing

MIN_SECONDS = 0.25  # a CPU timing runs at least reps calls and at least this long (at most 2000 calls)


def copies_beyond(cache_bytes: int, nbytes: int) -> int:
    """Weight copies of ``nbytes`` each that together exceed the cache 4x (at least 2), so that
    cycling through them streams every call's weights from memory."""
    return max(2, math.ceil(4 * cache_bytes / nbytes))


def cpu_median_us(fn, copies: int, reps: int) -> float:
    """Median wall-clock microseconds of fn(i) over at least reps calls (more for short calls,
    see MIN_SECONDS), cycling i through the copies, after one untimed call per copy."""
    for i in range(copies):
        fn(i)
    out = []
    start = time.perf_counter()
    r = 0
    while r < reps or (time.perf_counter() - start < MIN_SECONDS and r < 2000):
        t0 = time.perf_counter()
        fn(r % copies)
        out.append(time.perf_counter() - t0)
        r += 1
    return statistics.median(out) * 1e6


def cuda_graph(fn):
    """(CUDA graph of fn, fn's return value at capture), after two warm-up calls on a side stream."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cuda_graph_us(fns, reps: int = 20) -> float:
    """Median microseconds per call of a CUDA graph that runs every fn once, timed with CUDA
    events over ``reps`` replays."""
    import torch

    graph, _ = cuda_graph(lambda: [f() for f in fns])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


# ---------------------------------------------------------------- bandwidth probes

def cpu_read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5, huge_pages: bool = True) -> float:
    """GB/s of a streaming read of a buffer far beyond the LLC through the CPU kernels' own
    thread pool (``_lut.read_bytes``), best of ``reps``; the buffer in 2 MiB pages where Linux
    gives them, as the kernels' weight copies are (``huge_page_copy``), else in 4 KiB pages."""
    import torch

    from codequant.kernels.cpu import _lut, huge_page_copy

    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    buf = huge_page_copy(buf) if huge_pages else buf

    def read() -> float:
        t0 = time.perf_counter()
        _lut.read_bytes(buf.data_ptr(), buf.numel() * 8, threads)
        return time.perf_counter() - t0

    read()
    return nbytes / min(read() for _ in range(reps)) / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform reports."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def quick_read_bandwidth(threads: int, huge_pages: bool = True) -> float:
    """:func:`cpu_read_bandwidth` of 256 MiB, best of 2: a read taken right beside a timed setting,
    on a machine whose bandwidth changes within seconds (``cpu-threads-probe``)."""
    return cpu_read_bandwidth(threads, nbytes=1 << 28, reps=2, huge_pages=huge_pages)


def gpu_bandwidth() -> dict:
    """{"copy_gbps", "read_gbps"} of the GPU: a 4 GiB bf16 copy and a 4 GiB torch.amax, timed
    as :func:`cuda_graph_us`."""
    import torch

    n = 2**31  # 4 GiB of bf16
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    copy_us = cuda_graph_us([lambda: dst.copy_(src)], reps=10)
    out = torch.empty((), device="cuda", dtype=torch.bfloat16)
    read_us = cuda_graph_us([lambda: torch.amax(src, out=out)], reps=10)
    nbytes = src.numel() * 2
    res = {"copy_gbps": 2 * nbytes / copy_us / 1e3, "read_gbps": nbytes / read_us / 1e3}
    del src, dst
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- idle checks (shared CPU machine)

MAX_OTHER_CPU = 0.05  # a CPU block is repeated when other processes used more than this share of one CPU during it


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat) while this process sleeps."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes used, CPU seconds this process and its finished children used)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    t = os.times()
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def wait_until_idle(log: list, max_busy: float = 0.1, max_wait_s: float = 1800) -> None:
    """Before each timed block: wait (60 s steps) while other processes keep the CPUs busy;
    what was seen goes into ``log``."""
    waited = 0.0
    while True:
        busy = cpu_busy_fraction()
        if busy <= max_busy or waited >= max_wait_s:
            log.append({"time": time.strftime("%H:%M:%S"), "busy": round(busy, 3), "waited_s": waited})
            return
        print(f"machine busy ({busy:.0%} of the CPUs): waiting 60 s", flush=True)
        time.sleep(60)
        waited += 60
