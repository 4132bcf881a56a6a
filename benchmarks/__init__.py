"""aioproc benchmarks: ``python -m benchmarks``."""
