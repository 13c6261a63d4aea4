"""Where dtune runs, installed as `dtune.launchers`: `launcher=slurm` submits a SLURM job
(slurm.py); results.py writes the table every Hydra sweep leaves in its sweep dir. The local
launcher is dtune.launch.run_training."""
