"""Experiment configuration: one typed definition whose field names are the official JSON keys.

The official MIST code (algorithms.md §1) merges a JSON file into a plain ``dict``. Here the same keys are
fields of :class:`ExperimentConfig`; loading validates every key (unknown keys, types, ranges) in
one place and raises :class:`ConfigError` with the file, the key, the value and what is expected.

Keys that the official code accepts but never reads are kept as fields (marked "unused, as in the
original") so that the official JSON files load unchanged. Fixes for official quirks are extra
boolean or enum fields whose defaults reproduce the official behaviour (see docs/deviations.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

# the config API: the schema's names are imported from here by the components and tools
from utils.config_docs import README_END, README_START, markdown_tables  # noqa: F401
from utils.config_json import _check_value, _coerce, _first_nonfinite, _read_json_file, _type_name, _unknown_key
from utils.config_schema import (  # noqa: F401
    COMPOSITION_KEYS,
    CORE_FIELDS,
    EXTENSION_FIELDS,
    FIELDS,
    KEY_GROUPS,
    NONFINITE_NOTE,
    ConfigKeys,
    ExperimentConfig,
    InactiveKey,
    KeyGroup,
    config_keys,
    for_learners,
    inactive_keys,
    key,
    key_type,
)
from utils.errors import ConfigError
from utils.registry import DATASETS, LEARNERS, PRESETS


def config_from_dict(
    raw: Mapping[str, Any], where: str = "<config>", origins: Optional[Mapping[str, str]] = None
) -> ExperimentConfig:
    """Validate a raw key/value mapping and build the config.

    Args:
        raw: keys and JSON values, e.g. a loaded experiment file.
        where: the file name (or other origin) quoted in error messages.
        origins: per-key origins that replace ``where`` in messages about those keys, e.g.
            ``{"spr": "--set spr=bogus"}`` for values given on the command line.

    Raises:
        ConfigError: an unknown key (with the closest valid key), a value of the wrong type, a value
            out of range, or an inconsistent combination.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object of key/value pairs at the top level, not {raw!r}.")
    known = dict(origins or {})

    def origin(name: str) -> str:
        return known.get(name, where)

    values: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: key {name!r} is not a string; see README.md for the list of keys.")
        if name not in FIELDS:
            raise _unknown_key(name, origin(name))
        coerced = "none" if name == "spr" and value is None else _coerce(name, value, key_type(name), origin(name))
        _check_value(name, coerced, origin(name))
        values[name] = coerced
    core = {k: v for k, v in values.items() if k in CORE_FIELDS}
    cfg = ExperimentConfig(**core, extensions={k: v for k, v in values.items() if k not in CORE_FIELDS})
    if cfg.backbone_type:
        cfg.convnet_type = cfg.backbone_type
    _validate(cfg, origin)
    return cfg


def _validate(cfg: ExperimentConfig, origin: Callable[[str], str]) -> None:
    """Checks on whole keys and across keys; ``origin(key)`` names where a key's value came from."""
    recipe = None if cfg.spr == "none" else PRESETS.get(cfg.spr, origin("spr"))
    DATASETS.get(cfg.dataset, origin("dataset"))
    if cfg.weights_path is not None and not cfg.pretrained:
        where_w, where_p = origin("weights_path"), origin("pretrained")
        where = where_w if where_w == where_p else f"{where_w} and {where_p}"
        raise ConfigError(f"{where}: key 'weights_path' is set but key 'pretrained' is false; remove one of them.")
    LEARNERS.get(cfg.model_name, origin("model_name"))
    if Path(cfg.data_root).expanduser().is_file():
        raise ConfigError(f"{origin('data_root')}: key 'data_root' is {cfg.data_root}, a file; expected the folder "
                          "that holds the data sets (README, Data sets).")
    for name in COMPOSITION_KEYS:
        if getattr(cfg, name) is not None and (recipe is None or not recipe.selective):
            selective = [name for name, r in PRESETS.items() if r.selective]
            raise ConfigError(
                f"{origin(name)}: key '{name}' is set but spr {cfg.spr!r} has no scoring pass and task mask; "
                f"it applies to the presets {', '.join(selective)} (null leaves the preset's value)."
            )
    if cfg.budget is not None and recipe is not None and recipe.gate:
        raise ConfigError(f"{origin('budget')}: key 'budget' is set but spr {cfg.spr!r} takes its budget from "
                          "the gate; set gate_budget_large and gate_budget_small instead.")
    for group in KEY_GROUPS:
        if group.validate is not None:
            group.validate(cfg, origin)
    from utils.tensorboard_log import LOGGERS

    unknown = [name for name in cfg.loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"{origin('loggers')}: key 'loggers' has {', '.join(map(repr, unknown))}; expected a list "
                          f"of {', '.join(LOGGERS)} (or [] for none).")
    if cfg.strict_keys:
        unread = inactive_keys(cfg)
        if unread:
            raise ConfigError("; ".join(f"{origin(k.key)}: key '{k.key}' = {getattr(cfg, k.key)!r} has no effect: it "
                                        f"belongs to {k.owner}, and {k.why}" for k in unread)
                              + " (strict_keys is true; remove the key(s) or set strict_keys false to only warn).")


def parse_override(item: str) -> tuple[str, Any]:
    """Split one ``--set key=value`` item; the value is JSON if it parses, else a plain string.

    Raises:
        ConfigError: the item has no '=' or no key before it.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set mi_epochs=2")
    name, text = item.split("=", 1)
    name = name.strip()
    if not name:
        raise ConfigError(f"--set {item!r}: expected key=value with a key name before '=', e.g. --set mi_epochs=2")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (JSONDecodeError), an over-long integer, deep nesting
        value = text
    return name, value


def load_config(path: Optional[Union[str, Path]], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment JSON file, apply ``--set`` overrides and validate.

    Args:
        path: JSON file with official keys, or None for all defaults.
        overrides: ``key=value`` strings, applied in order after the file; values are parsed against
            the key's type (``--set use_RP=False``, ``--set seed=[1,2]``, ``--set device=cpu``; a number
            or true/false given for a string key, e.g. ``--set prefix=2024``, is kept as the text).

    Raises:
        ConfigError: unreadable file, invalid JSON, or any validation error (see config_from_dict).
            Errors about a value given with ``--set`` name that ``--set KEY=VALUE``, not the file.
    """
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        raw = _read_json_file(path)
        raw["config"] = where
    origins: dict[str, str] = {}
    for item in overrides:
        name, value = parse_override(item)
        origin = f"--set {item}"
        if name not in FIELDS:
            raise _unknown_key(name, origin)
        tp = key_type(name)
        text = item.split("=", 1)[1].strip()
        if tp in (str, Optional[str]) and isinstance(value, (bool, int, float)):
            value = text  # a name that reads as a number or boolean, e.g. prefix=2024 or prefix=NaN
        if _first_nonfinite(value) is not None:
            raise ConfigError(f"{origin}: key '{name}' has value {text}; expected {_type_name(tp)}; {NONFINITE_NOTE}.")
        if tp in (bool, Optional[bool]) and value in ("True", "False"):
            value = value == "True"  # a command-line word, not the official JSON string quirk
        if not (name == "spr" and value is None):
            value = _coerce(name, value, tp, origin)
            _check_value(name, value, origin)
        raw[name] = value
        origins[name] = origin
    return config_from_dict(raw, where, origins)


def warn_ignored(name: str, value: Any, used: Any, reason: str = "") -> None:
    """Log that a JSON key is ignored in favour of the official constant, when the two differ (STYLE 3.2)."""
    if value != used:
        logging.getLogger(__name__).warning("Config key '%s' = %r is ignored: %r is used, as the official code "
                                           "does. %s", name, value, used, reason)


if __name__ == "__main__":  # run as utils.config, the module the components register their keys in
    import sys

    from utils import config_docs

    sys.exit(config_docs.main())
