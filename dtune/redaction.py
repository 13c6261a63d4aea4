"""Secrets typed on the command line: which keys count as secret, and how their values are kept
out of messages, Hydra's saved files and trackers.

Command-line overrides are saved in plain text under RUN_DIR/.hydra and uploaded by W&B, so a
secret never stays one. A secret meant for the environment (`hydra.job.env_set.HF_TOKEN=...`,
with `+`/`++`, or inside a `hydra.job.env_set={...}` mapping) is moved into this process's
environment before Hydra parses the command line; any other secret-looking key, at any depth
of an override's value or of the composed config, is refused. Either way the user is told to
export it instead. `redact` is the one pass over what dtune writes out (.hydra/, W&B).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys

from dtune.errors import MASK, SEEN_SECRETS, DtuneError

ENV_SET = "hydra.job.env_set."
# Environment variables whose values must never reach a file or W&B, however they got into a
# string.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
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


def parsed_value(override: str):
    """An override's value as Hydra's grammar reads it (a dict for `k={a: 1}`), or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception:  # not grammatical: the grammar check says so in its own words later
        return None


def nested_secret_keys(value, prefix: str = "") -> list[str]:
    """The secret-looking keys, dotted, anywhere inside a dict/list value that hold a value."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}{key}"
            if is_secret_key(str(key)) and item not in (None, "", {}, []):
                found.append(name)
            else:
                found += nested_secret_keys(item, name + ".")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found += nested_secret_keys(item, f"{prefix}{index}.")
    return found


def _env_value(value) -> str:
    """A value as Hydra's grammar writes it, quoted where it is not a plain word."""
    text = str(value)
    if re.fullmatch(r"[\w./:@%+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _move_to_environment(name: str, value, key: str) -> None:
    value = _unquote(str(value))
    os.environ[name] = value
    remember(value)
    print(f"dtune: warning: {key}={MASK} puts a secret on the command line, where your "
          f"shell history and the process list keep it. dtune moved it into this run's "
          f"environment and kept it out of RUN_DIR/.hydra and W&B; next time export "
          f"{name} in the environment instead.", file=sys.stderr)


def take_env_secrets(argv: list[str]) -> list[str]:
    """`argv` without the secrets it sets for the environment (`hydra.job.env_set.<SECRET>=v`,
    with any `+`/`++`, or as entries of `hydra.job.env_set={...}`), whose values go into
    os.environ instead (so the run and its workers still get them), with a warning each. The
    non-secret entries of such a mapping stay, one override each."""
    kept = []
    for arg in argv:
        key, value = split_override(arg)
        if arg.startswith("-") or value is None or not (key + ".").startswith(ENV_SET):
            kept.append(arg)
        elif key.startswith(ENV_SET):
            if is_secret_key(key):
                _move_to_environment(key[len(ENV_SET):], value, key)
            else:
                kept.append(arg)
        else:  # the whole mapping: hydra.job.env_set={A: x, HF_TOKEN: y}
            mapping = parsed_value(arg)
            if not isinstance(mapping, dict):
                kept.append(arg)
                continue
            for name, item in mapping.items():
                if is_secret_key(str(name)):
                    _move_to_environment(str(name), item, f"{ENV_SET}{name}")
                else:
                    kept.append(f"++{ENV_SET}{name}={_env_value(item)}")
    return kept


def refuse_secret_overrides(overrides: list[str]) -> None:
    """Refuse a secret typed as a config value, also as a key inside a mapping or list value
    (`parallelism.deepspeed_overrides={api_key: ...}`): Hydra would save it in plain text."""
    for override in overrides:
        key, value = split_override(override)
        if value is None:
            continue
        inner = nested_secret_keys(parsed_value(override)) if "{" in value or "[" in value \
            else []
        if not is_secret_override(override) and not inner:
            continue
        remember(value)
        shown = mask_override(override) if not inner else key + "=" + MASK
        named = key.rsplit(".", 1)[-1] if not inner else f"{key}.{inner[0]}"
        fix = (f"export {key[len(ENV_SET):]}=... in the environment" if key.startswith(ENV_SET)
               else "export the secret in the environment (WANDB_API_KEY for W&B, HF_TOKEN "
               "for the Hugging Face hub)")
        raise DtuneError(
            f"the override {shown!r} looks like a secret (its key {named!r} names a "
            "credential), and dtune takes no secrets as config values: every override is "
            f"saved in plain text under RUN_DIR/.hydra and sent to the tracker. Remove it and "
            f"{fix} instead; dtune redacts environment secrets from everything it saves or "
            "uploads.")


def refuse_secret_settings(tree: dict, origin: str = "the configuration") -> None:
    """Refuse a composed config that holds a secret-looking key anywhere (a YAML file's
    free-form mapping, say): what a run saves and uploads is its config."""
    found = nested_secret_keys(tree)
    if found:
        raise DtuneError(
            f"{origin} sets {found[0]!r}, whose key names a credential, and dtune takes no "
            "secrets as config values: the config is saved under RUN_DIR/.hydra and sent to "
            f"the tracker. Remove {found[0]} and export the secret in the environment instead "
            "(the library that needs it reads it there).")


def secret_values(env=None) -> list[str]:
    """The values of the environment's secret-looking variables (8 characters or more)."""
    env = os.environ if env is None else env
    return [v for k, v in env.items()
            if (SECRET_NAME.search(k) or is_secret_key(k)) and len(v) >= 8]


def redact(value, secret_list: list[str] | None = None):
    """`value` with the value of every secret-looking key, every secret typed on this command
    line and every environment secret in its strings replaced by `***`; non-finite floats
    become None. The one pass over what dtune writes out: .hydra/, W&B's config and summary."""
    secret_list = sorted(set(secret_values() if secret_list is None else secret_list)
                         | SEEN_SECRETS, key=len, reverse=True)
    if isinstance(value, dict):
        return {k: (MASK if is_secret_key(str(k)) and v not in (None, "", {}, [])
                    else redact(v, secret_list)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secret_list) for v in value]
    if isinstance(value, str):
        for secret in secret_list:
            value = value.replace(secret, MASK)
        return mask_override(value) if "=" in value else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
