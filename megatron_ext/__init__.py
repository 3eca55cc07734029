"""megatron-ext: a Megatron-style LLM training stack for Slurm clusters."""

__version__ = "0.1.0"
