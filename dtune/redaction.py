"""Secrets typed on the command line: which keys count as secret, and how their values are kept
out of messages, Hydra's saved files and trackers.

Command-line overrides are saved in plain text under RUN_DIR/.hydra and uploaded by W&B, so a
secret never stays one. A secret meant for the environment (`hydra.job.env_set.HF_TOKEN=...`)
is moved into this process's environment before Hydra parses the command line; any other
secret-looking override is refused. Either way the user is told to export it instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from dtune.errors import MASK, SEEN_SECRETS, DtuneError

ENV_SET = "hydra.job.env_set."
# Words that name a credential when they end a key (`api_key`, `hf_token`, `WANDB_API_KEY`).
# Plurals stay out on purpose: `max_new_tokens` and `data.max_tokens` count tokens.
SECRET_WORDS = {"key", "apikey", "token", "authtoken", "accesstoken", "secret", "secrets",
                "secretkey", "privatekey", "password", "passwd", "credential", "credentials"}
# `<role>_token` names a vocabulary entry, not a credential (`pad_token`, `eos_token`).
TOKEN_ROLES = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "start", "end", "special",
               "image", "audio", "video", "boi", "eoi", "bot", "eot", "think", "tool"}


def is_secret_key(key: str) -> bool:
    """Whether the last segment of a dotted (or `/`-separated) key names a credential."""
    leaf = re.split(r"[./]", key.split("@", 1)[0])[-1]
    leaf = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", leaf)  # apiKey -> api_Key
    parts = [p for p in re.split(r"[_\-]", leaf.lower()) if p]
    if not parts or parts[-1] not in SECRET_WORDS:
        return False
    return not (parts[-1] == "token" and len(parts) > 1 and parts[-2] in TOKEN_ROLES)


def split_override(override: str) -> tuple[str, str | None]:
    """(key, value or None) of a Hydra override such as `+a.b=c`, `~a.b` or `group@pkg=x`."""
    body = override.lstrip("+~")
    key, sep, value = body.partition("=")
    return key, (value if sep else None)


def is_secret_override(override: str) -> bool:
    key, value = split_override(override)
    return value is not None and is_secret_key(key)


def mask_override(override: str) -> str:
    """The override with its value masked if its key names a secret, else unchanged."""
    if not is_secret_override(override):
        return override
    return override.partition("=")[0] + "=" + MASK


def mask_text(text: str, overrides: list[str] = ()) -> str:
    """`text` with the values of secret overrides, and every secret seen so far, masked."""
    values = {split_override(o)[1] for o in overrides if is_secret_override(o)} | SEEN_SECRETS
    for value in sorted((v for v in values if v), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def remember(value: str) -> None:
    """Mask `value` from now on in dtune's error messages and log lines."""
    if value:
        SEEN_SECRETS.add(value)


def _unquote(value: str) -> str:
    # Hydra's own quoting; the shell's is gone by now. Not the grammar: `1e5` must stay text.
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def take_env_secrets(argv: list[str]) -> list[str]:
    """`argv` without its `hydra.job.env_set.<SECRET>=value` overrides, whose values go into
    os.environ instead (so the run and its workers still get them), with a warning each."""
    kept = []
    for arg in argv:
        key, value = split_override(arg)
        if arg.startswith("-") or not key.startswith(ENV_SET) or not is_secret_override(arg):
            kept.append(arg)
            continue
        name, value = key[len(ENV_SET):], _unquote(value)
        os.environ[name] = value
        remember(value)
        print(f"dtune: warning: {key}={MASK} puts a secret on the command line, where your "
              f"shell history and the process list keep it. dtune moved it into this run's "
              f"environment and kept it out of RUN_DIR/.hydra and W&B; next time export "
              f"{name} in the environment instead.", file=sys.stderr)
    return kept


def refuse_secret_overrides(overrides: list[str]) -> None:
    """Refuse a secret typed as a config value: Hydra would save it in plain text."""
    for override in overrides:
        if not is_secret_override(override):
            continue
        key = split_override(override)[0]
        remember(split_override(override)[1])
        fix = (f"export {key[len(ENV_SET):]}=... in the environment" if key.startswith(ENV_SET)
               else "export the secret in the environment (WANDB_API_KEY for W&B, HF_TOKEN "
               "for the Hugging Face hub)")
        raise DtuneError(
            f"the override {mask_override(override)!r} looks like a secret (its key "
            f"{key.rsplit('.', 1)[-1]!r} names a credential), and dtune takes no secrets as "
            "config values: every override is saved in plain text under RUN_DIR/.hydra and "
            f"sent to the tracker. Remove it and {fix} instead; dtune redacts environment "
            "secrets from everything it saves or uploads.")


@contextlib.contextmanager
def masked_argv():
    """sys.argv with secret override values masked, for libraries that record the command
    line (W&B's run metadata reads sys.argv while it starts)."""
    real = sys.argv
    sys.argv = [mask_text(mask_override(arg)) for arg in real]
    try:
        yield
    finally:
        sys.argv = real


class MaskSecrets(logging.Filter):
    """Masks the secrets seen on the command line in every record a logger emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        if SEEN_SECRETS:
            message = record.getMessage()
            masked = mask_text(message)
            if masked != message:
                record.msg, record.args = masked, ()
        return True
