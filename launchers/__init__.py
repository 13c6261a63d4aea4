"""Where dtune runs: `launcher=local` trains in this process, `launcher=slurm` submits a SLURM
job (slurm.py); results.py writes the table every Hydra sweep leaves in its sweep dir."""
