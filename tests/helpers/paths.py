"""Paths of the repository the tests read."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "models" / "codequant-moe-tiny"  # the bundled tiny Qwen3-MoE checkpoint (and its tokenizer)
