"""dtune: fine-tune large language models on one GPU, many GPUs, or many SLURM nodes."""
import logging

__version__ = "0.1.0"

# bitsandbytes warns at import time about an optional CPU kernel package, and peft imports it;
# quieten its logger before any dtune module imports either.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
