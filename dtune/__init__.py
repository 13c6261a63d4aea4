"""dtune: fine-tune large language models on one GPU, many GPUs, or many SLURM nodes."""

__version__ = "0.1.0"
