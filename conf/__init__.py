# Makes conf/ the regular package dtune.conf when installed: Hydra finds the configs of a
# non-editable install (pip install ., the container image) only in a package with an __init__.py.
