"""README's config-key tables, generated from the keys' help texts (``python -m utils.config --write-readme``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.config_schema import CORE_FIELDS, FIELDS, KEY_GROUPS, _default
from utils.registry import ALL as REGISTRIES
from utils.registry import load_components

# ---------------------------------------------------------------------------------------------
# README's key tables, generated from the fields' help texts
# ---------------------------------------------------------------------------------------------
#: the core keys' tables: (title, first key of the section), in field order
CORE_SECTIONS = (
    ("Official keys", "dataset"),
    ("Official keys the original ignores (accepted, unused)", "prefix"),
    ("Backbone", "backbone_type"),
    ("Data", "data_root"),
    ("Tuning-phase options and fixes of official quirks", "mist_tasks"),
    ("Composition of the tuning phase (null = the preset's part; task-level presets only)", "importance"),
    ("Runtime", "seed_torch_with_seed"),
)
README_START, README_END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def markdown_tables() -> str:
    """Every config key as README's markdown tables: the core sections, then each component's keys (titled by the
    component, in title order), each row ``| `key` | `default` | help |``. README.md holds this text between
    ``README_START`` and ``README_END`` (``python -m utils.config --write-readme``; a test checks they agree)."""
    load_components()
    starts = {first: title for title, first in CORE_SECTIONS}
    groups: list[tuple[str, list[str]]] = []
    for name in CORE_FIELDS:
        if name in starts or not groups:
            groups.append((starts.get(name, "Keys"), []))
        groups[-1][1].append(name)
    groups += [(g.title, list(g.names)) for g in sorted(KEY_GROUPS, key=lambda g: g.title.lower())]
    out = []
    for title, names in groups:
        out += [f"**{title}**", "", "| key | default | meaning |", "|---|---|---|"]
        for name in names:
            help_text = describe(name).replace("|", "\\|")
            default = json.dumps(_default(FIELDS[name]))
            out.append(f"| `{name}` | `{default}` | {help_text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def describe(name: str) -> str:
    """The help text of config key ``name``; for a key whose values are registered names, followed by the names
    registered now (aliases in brackets), so the help never lists a name that is not there."""
    meta = FIELDS[name].metadata
    if "registry" not in meta:
        return meta["help"]
    registry = REGISTRIES[meta["registry"]]
    if meta["registry"] == "preset":  # each preset's provenance, from its registration
        official = [n for n, p in registry.items() if p.official]
        others = [f"{n} ({p.source})" for n, p in registry.items() if not p.official]
        return (f"{meta['help']} Official: {', '.join(official)}. Others: {'; '.join(others)}. Also: "
                f"{', '.join(registry.extras)}.")
    names = [n + (f" ({', '.join(registry.aliases(n))})" if registry.aliases(n) else "") for n in registry.names()]
    return f"{meta['help']} Registered: {', '.join([*names, *registry.extras])}."


def _write_readme(path: Path) -> bool:
    """Replace README's generated region with :func:`markdown_tables`; True if the file changed.

    Raises:
        ValueError: the file lacks the start or end marker.
    """
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} region")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{markdown_tables()}{README_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m utils.config``: print the key tables, or ``--write-readme`` to update README.md's region."""
    import argparse

    parser = argparse.ArgumentParser(description="Print the config keys as markdown, or update README.md's tables.")
    parser.add_argument("--write-readme", type=Path, nargs="?", const=Path(__file__).resolve().parents[1] / "README.md",
                        help="rewrite the generated region of README.md (default path: the repository's)")
    args = parser.parse_args(argv)
    if args.write_readme is not None:
        try:
            changed = _write_readme(args.write_readme)
        except (OSError, ValueError) as exc:
            print(f"error: --write-readme {args.write_readme}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return 2
        print("updated" if changed else "unchanged", args.write_readme)
    else:
        sys.stdout.write(markdown_tables())
    return 0


if __name__ == "__main__":  # run as utils.config, the module the components register their keys in
    from utils import config as _registered

    sys.exit(_registered.main())
