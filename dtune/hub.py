"""Whether the Hugging Face hub answers, asked once per process before the first call that
would reach it.

Offline, huggingface_hub and datasets retry a host that does not answer for half a minute and
more, each retry a log line (datasets' printed twice). One plain connect answers at once; when
it fails, every library is put in its offline mode (the local cache only) and dtune says so in
one line. HF_HUB_OFFLINE=1 skips the question.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlparse

log = logging.getLogger("dtune")

_ANSWER: list[bool] = []  # this process's answer, once asked


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub answers; else (or with HF_HUB_OFFLINE=1) False, with every library
    switched to offline mode."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        go_offline()
        return False
    if not _ANSWER:
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            with socket.create_connection((endpoint.hostname, endpoint.port or 443),
                                          timeout=timeout):
                _ANSWER.append(True)
        except OSError:
            _ANSWER.append(False)
            go_offline()
            log.warning("The Hugging Face hub (%s) does not answer from this machine: working "
                        "offline, from the local caches only (HF_HUB_OFFLINE=1 skips this "
                        "check).", endpoint.hostname)
    return _ANSWER[0]


def go_offline() -> None:
    """Offline mode for the hub libraries, already imported or not: their flags are read from
    the environment when they are imported, and kept in module constants after."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        if hasattr(config, "HF_DATASETS_OFFLINE"):
            config.HF_DATASETS_OFFLINE = True
