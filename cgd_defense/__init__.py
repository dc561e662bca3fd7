"""cgd-bench: CLIP-Guided backdoor Defense (CGD) and the benchmark it is judged on."""

__version__ = "0.1.0"
