"""Reading a config's JSON and coercing its values (``utils/config.py``): UTF-8 only, no duplicate keys, finite numbers,
each value checked against its key's type, bounds and registry, with one error naming the key, the value and what is
expected."""

from __future__ import annotations

import codecs
import difflib
import json
import math
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

from utils.config_schema import DEVICE_FORMS, FIELDS, NONFINITE_NOTE, SEED_MAX, key_type
from utils.errors import ConfigError
from utils.registry import ALL as REGISTRIES


# ---------------------------------------------------------------------------------------------
# value coercion
# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        plural = {int: "integers", str: "strings"}.get(item_tp, "such values")
        return f"{_type_name(item_tp)} or a list of {plural}"
    if origin is dict:
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{where}: key '{key}' has value {value!r}; expected {_type_name(tp)}{extra}.")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner[0], where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        if key == "device":  # official forms: ["0"], ["0","1"], "cpu", -1
            for v in items:
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise ConfigError(f"{where}: key 'device' has value {value!r}; expected {DEVICE_FORMS}.")
            return [str(v) for v in items]
        if value is None:
            raise bad()
        return [_coerce(key, v, item_tp, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{where}: key '{key}' has value {value!r} with the non-string key {name!r}; "
                                  "expected an object whose keys are strings.")
        inner = _first_nonfinite(value)
        if inner is not None:
            raise ConfigError(f"{where}: key '{key}' has a non-finite number at {key}{inner}; "
                              f"expected finite numbers; {NONFINITE_NOTE}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in ("True", "False", "true", "false"):
            parsed = value in ("True", "true")
            if key == "use_RP" and not parsed:
                warnings.warn(
                    f"{where}: use_RP is the string {value!r}. It is parsed as false here, but the official code "
                    "tests only truthiness, so there any non-empty string, \"False\" included, enables RP.",
                    stacklevel=2,
                )
            return parsed
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                raise bad(f" such as {int(value)}")  # 2000.0: JSON floats are not taken for integer keys
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"; {NONFINITE_NOTE}")
            raise bad()
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise bad(f"; {NONFINITE_NOTE}") from None
        if not math.isfinite(number):
            raise bad(f"; {NONFINITE_NOTE}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if "\x00" in value:  # a NUL character fails every later use as a path or file name
            raise bad(" without NUL characters")
        return value
    raise TypeError(f"unsupported field type {tp!r} for {key}")


def _check_range(key: str, value: Any, where: str) -> None:
    """Check the metadata choices and bounds (min/ge/gt/le/lt) of a field on a value or on each item of a list."""
    if isinstance(value, list):
        for item in value:
            _check_range(key, item, where)
        return
    meta = FIELDS[key].metadata
    if "registry" in meta and value is not None and value not in REGISTRIES[meta["registry"]].extras:
        REGISTRIES[meta["registry"]].get(value, where)
    if "choices" in meta and value is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: key '{key}' has value {value!r}; "
                          f"expected one of {', '.join(meta['choices'])}{hint}.")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = [("min", lambda v, b: v >= b, ">="), ("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, sym in checks:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{where}: key '{key}' has value {value!r}; expected a value {sym} {meta[name]}.")


def _check_value(key: str, value: Any, where: str) -> None:
    """Check one coerced value on its own: metadata bounds, then the list keys' own rules."""
    _check_range(key, value, where)
    if key == "seed":
        if not value:
            raise ConfigError(f"{where}: key 'seed' is an empty list; expected at least one integer seed.")
        seen: set[int] = set()
        for seed in value:
            if not 0 <= seed <= SEED_MAX:
                raise ConfigError(f"{where}: key 'seed' has value {seed!r}; expected an integer seed from 0 to "
                                  f"{SEED_MAX} (numpy's seed range).")
            if seed in seen:
                raise ConfigError(f"{where}: key 'seed' has value {value!r}, which lists seed {seed} more than once; "
                                  "expected distinct seeds (each seed runs once and writes its own seed folder).")
            seen.add(seed)
    if key == "device" and not value:
        raise ConfigError(f"{where}: key 'device' is an empty list; expected e.g. [\"0\"] or \"cpu\".")


def _first_nonfinite(value: Any, path: str = "") -> Optional[str]:
    """Where the first NaN/Infinity float sits in a JSON value: "" for the value itself, e.g. '["x"]' or
    '[1]' inside it, or None when every number is finite. Dicts and lists are walked in document order."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, dict):
        items = ((f"[{json.dumps(k) if isinstance(k, str) else repr(k)}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for step, item in items:
        found = _first_nonfinite(item, path + step)
        if found is not None:
            return found
    return None


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity|NaN|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?')


def _locate_nonfinite(text: str) -> Optional[tuple[str, int, int]]:
    """The first NaN, Infinity, -Infinity or overflowing number (1e400) outside strings in JSON text
    that parsed: (token, line, column), or None."""
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token.startswith('"'):
            continue
        if token in ("NaN", "Infinity", "-Infinity") or (
            any(c in token for c in ".eE") and not math.isfinite(float(token))
        ):
            pos = match.start()
            return token, text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    return None


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see README.md for the list of keys."
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _read_json_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read and parse one config file: a JSON object in UTF-8, no duplicate keys, finite numbers only.

    Raises:
        ConfigError: the path is missing, a directory or unreadable; the bytes are not UTF-8; the text
            is not JSON or not an object; a key repeats; a number is NaN, Infinity or overflows.
    """
    where = str(path)
    p = Path(path)
    example = "expected a JSON file such as exps/ranpac/cifar.json"
    try:
        if p.is_dir():
            raise ConfigError(f"config file {where} is a directory ({example}).")
        if not p.is_file():
            if p.exists():
                raise ConfigError(f"config file {where} is not a regular file ({example}).")
            raise ConfigError(f"config file {where!s} does not exist ({example}).")
        data = p.read_bytes()
    except OSError as exc:  # permission denied, name too long, I/O error
        raise ConfigError(f"config file {where} cannot be read: {exc.strerror or exc} ({example}).") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(
            f"{where}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) cannot be "
            "decoded; save the file as UTF-8."
        ) from None
    if not text.strip():
        raise ConfigError(f"{where}: the file is empty; expected a JSON object of key/value pairs.")

    duplicates: list[tuple[dict, str, Any, Any]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append((obj, key, obj[key], value))
            obj[key] = value
        return obj

    try:
        raw = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid JSON: arrays or objects are nested too deeply to read.") from None
    except ValueError:  # an integer literal with more digits than Python converts
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise ConfigError(f"{where}: invalid JSON: a number has more than {limit} digits.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object of key/value pairs at the top level.")
    if duplicates:
        obj, key, first, second = duplicates[0]
        if obj is raw:
            raise ConfigError(f"{where}: key '{key}' appears more than once (values {first!r} and {second!r}); "
                              "expected each key once.")
        top = next((k for k, v in raw.items() if _holds(v, obj)), "?")
        raise ConfigError(f"{where}: key '{top}' holds an object in which key '{key}' appears more than once "
                          f"(values {first!r} and {second!r}); expected each key once.")
    for key, value in raw.items():
        inner = _first_nonfinite(value)
        if inner is None:
            continue
        if key not in FIELDS:
            break  # config_from_dict names the unknown key first
        tp = key_type(key)
        if not inner:
            expected = _type_name(tp)
        elif typing.get_origin(tp) is list:
            expected = _type_name(typing.get_args(tp)[0])
        else:
            expected = "a finite number"
        found = _locate_nonfinite(text)  # the same number: both walk the document in order
        token, at = (found[0], f" (line {found[1]}, column {found[2]})") if found else (repr(value), "")
        nested = f" at {key}{inner}" if inner else ""
        raise ConfigError(f"{where}: key '{key}' has value {token}{nested}{at}; expected {expected}; {NONFINITE_NOTE}.")
    return raw


def _holds(value: Any, target: Any) -> bool:
    """Whether ``target`` is ``value`` or nested inside it (by identity)."""
    if value is target:
        return True
    if isinstance(value, dict):
        return any(_holds(v, target) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, target) for v in value)
    return False
