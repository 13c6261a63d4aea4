"""dtune: fine-tune large language models on one GPU, many GPUs, or many SLURM nodes."""
from dtune.logs import filter_library_noise

__version__ = "0.1.0"

# Here, so that it happens once in every process that runs dtune, before any library is
# imported or warns.
filter_library_noise()
