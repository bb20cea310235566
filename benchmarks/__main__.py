"""The one entry point of the benchmarks, from the repository root:

    python -m benchmarks <name> [args]       (python -m benchmarks <name> --help: its options)

Each name runs the ``main(argv)`` of one module of this package.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {  # name: (module, what it measures)
    "cpu": ("bench_cpu", "CPU LUT kernels against torch and llama.cpp's ggml"),
    "cpu-act-groups": ("bench_cpu_act_groups", "CPU linear with activations per token against per channel group"),
    "cpu-e2e": ("bench_cpu_e2e", "CPU end-to-end decode, CodeQuant against bf16"),
    "cpu-build-ab": ("ab_cpu_build", "the CPU linear kernels of this tree against another build, side by side"),
    "cpu-threads-probe": ("probe_cpu_threads", "the CPU kernels at 1 and 2 threads beside the read bandwidth measured around them"),
    "gpu": ("bench_gpu", "GPU dense and MoE kernels against cuBLAS, torch int4 and torch._grouped_mm"),
    "gpu-decode": ("bench_gpu_decode", "GPU decode (M <= 16) on the CUDA kernels"),
    "gpu-e2e": ("bench_gpu_e2e", "GPU end-to-end decode of the Qwen3-30B-A3B-shaped model"),
    "gpu-profile-e2e": ("profile_gpu_e2e", "where a compiled GPU decode step spends its time"),
    "gpu-router": ("bench_gpu_router", "the MoE router alone: transformers' against the fused CUDA router"),
    "gpu-pdl": ("ab_gpu_pdl", "programmatic dependent launch on / off"),
    "gpu-probe-read": ("probe_gpu_read", "how fast the index stream can be read at all"),
    "gpu-probe-decomp": ("probe_gpu_decomp", "the decode kernel without its lookup and / or mma"),
    "gpu-probe-w4a4": ("probe_gpu_w4a4", "W4A4 decode parts, against a baseline build"),
    "gpu-probe-launch": ("probe_gpu_launch", "W4A16 decode at fixed launch configs, PDL on / off"),
    "hadamard": ("bench_hadamard", "the online block Hadamard: one matmul against its Kronecker factors"),
    "quantize-memory": ("bench_quantize_memory", "peak memory and time of quantize on real MoE shapes"),
    "vllm": ("bench_vllm", "vLLM serving speed on the CPU"),
    "vllm-profile": ("profile_vllm_step", "where one CPU decode token goes under vLLM and under transformers"),
    "vllm-layers": ("profile_vllm_layers", "one vLLM decoder layer's CPU decode time, module by module"),
    "op-call-overhead": ("op_call_overhead", "host cost per call: pybind11 against a TORCH_LIBRARY op"),
    "checkpoint-sizes": ("checkpoint_sizes", "checkpoint sizes of the fixture at 4, 3 and 2 bits"),
    "compare-peers": ("compare_peers", "CodeQuant against AutoRound and GPTQModel"),
}


def main() -> int | None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        width = max(map(len, BENCHMARKS))
        listing = "\n".join(f"  {name:{width}}  {what}" for name, (_, what) in BENCHMARKS.items())
        sys.exit(f"usage: python -m benchmarks <name> [args]\n\nnames:\n{listing}")
    name, argv = sys.argv[1], sys.argv[2:]
    sys.argv = [f"python -m benchmarks {name}", *argv]  # the program name in the benchmark's usage and help
    return importlib.import_module(f"benchmarks.{BENCHMARKS[name][0]}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
