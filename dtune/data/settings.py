"""The data settings' own checks, which read no file: where the rows come from, how sources
combine, the built-in task set, what a stream can do. dtune.settle runs them before launch,
so a SLURM job is not queued for a config its first minute would refuse; the checks that read
files and rows run when the run starts (dtune.data.read)."""
from __future__ import annotations

from dtune.config import Config
from dtune.errors import DtuneError


def check_data_settings(cfg: Config) -> None:
    import dtune.data.builtin as builtin  # the module, not its names: see dtune/data/streaming.py
    from dtune.data.sources import source_specs

    if cfg.data.sources and cfg.data.eval_path:
        raise DtuneError(
            f"data.eval_path={cfg.data.eval_path!r} is one file, and data.sources is a "
            "mixture; give each source its own eval_path (or eval_split), so eval loss is "
            "reported per source, or leave them unset to hold out data.eval_fraction of each.")
    specs = source_specs(cfg.data)
    for spec in specs:
        if spec.path == "builtin":
            builtin.check_builtin(spec.format, list(cfg.data.builtin.tasks))
    if cfg.data.streaming:
        read = [] if cfg.data.path == "builtin" and not cfg.data.sources else specs
        check_streaming(cfg, read)


def check_streaming(cfg: Config, specs: list) -> None:
    """What data.streaming=true cannot do; `specs`: the sources the stream reads."""
    if cfg.train.max_steps <= 0:
        raise DtuneError(
            f"data.streaming=true needs train.max_steps (it is {cfg.train.max_steps}): a stream "
            "has no length, so train.epochs cannot set the step count. Give the number of "
            "optimizer steps, e.g. train.max_steps=10000.")
    if cfg.train.epochs is not None:
        raise DtuneError(
            f"train.epochs={cfg.train.epochs} with data.streaming=true: a stream has no length, "
            f"so it has no epochs; train.max_steps={cfg.train.max_steps} alone sets the run's "
            "length (the stream starts over when it ends). Remove train.epochs.")
    fractions = [s.name for s in specs if s.fraction is not None]
    if fractions:
        raise DtuneError(
            f"data.sources: {', '.join(fractions)} set fraction, which data.streaming=true "
            "cannot apply (a stream has no length); give weight instead.")
    formats = sorted({s.row_format for s in specs})
    if len(formats) > 1:
        raise DtuneError(
            f"data.streaming=true interleaves the sources into one stream, and these have "
            f"different formats ({', '.join(formats)}); stream sources of one format, or set "
            "data.streaming=false.")
