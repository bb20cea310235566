"""CodeQuant's benchmarks: run them with ``python -m benchmarks <name> [args]`` from the repository root."""
