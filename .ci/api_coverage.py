"""Share of public functions that are typed and documented (issue 27), in models/, utils/ and backbones/.

A public function is a ``def`` whose name does not start with ``_`` (``__init__`` included), at module level or in a
class whose name does not start with ``_``; nested functions are not counted. Typed: every parameter but
``self``/``cls`` and ``*args``/``**kwargs`` has an annotation, and so does the return (``__init__`` and property
setters excepted). Documented: a docstring of its own, an ``__init__`` of a class with a docstring (which documents
the arguments), or an override of a method that a base class (by name, anywhere in the three packages) documents.

    python .ci/api_coverage.py [--min-typed PCT] [--min-doc PCT] [--list]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils", "backbones")


def public_functions(tree: ast.Module):
    """(qualified name, FunctionDef, class or None) for every public function of a module."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, None
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"):
                    yield f"{node.name}.{item.name}", item, node


def is_typed(fn: ast.FunctionDef, method: bool) -> bool:
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    if method and args and args[0].arg in ("self", "cls") and not any(
            isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        args = args[1:]
    setter = any(isinstance(d, ast.Attribute) and d.attr == "setter" for d in fn.decorator_list)
    needs_return = fn.name != "__init__" and not setter
    return all(a.annotation is not None for a in args) and (fn.returns is not None or not needs_return)


def documented_methods(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    """Class name -> names of its methods that have a docstring (over the whole package set)."""
    out: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, set()).update(
                    item.name for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(item))
    return out


def measure(root: Path = ROOT) -> tuple[int, int, int, list[str], list[str]]:
    """(public functions, typed, documented, untyped names, undocumented names)."""
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in files}
    documented = documented_methods(trees)
    total = typed = doc = 0
    untyped, undocumented = [], []
    for path, tree in trees.items():
        for name, fn, cls in public_functions(tree):
            total += 1
            where = f"{path.relative_to(root)}:{fn.lineno} {name}"
            if is_typed(fn, cls is not None):
                typed += 1
            else:
                untyped.append(where)
            inherited = cls is not None and any(
                isinstance(b, ast.Name) and fn.name in documented.get(b.id, set()) for b in cls.bases)
            init = cls is not None and fn.name == "__init__" and ast.get_docstring(cls)
            if ast.get_docstring(fn) or inherited or init:
                doc += 1
            else:
                undocumented.append(where)
    return total, typed, doc, untyped, undocumented


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--min-typed", type=float, default=0.0, help="fail below this share (%%)")
    parser.add_argument("--min-doc", type=float, default=0.0, help="fail below this share (%%)")
    parser.add_argument("--list", action="store_true", help="list the untyped and undocumented functions")
    args = parser.parse_args(argv)
    total, typed, doc, untyped, undocumented = measure(args.root)
    typed_pct, doc_pct = 100 * typed / total, 100 * doc / total
    print(f"public functions in {', '.join(PACKAGES)}: {total}; typed {typed} ({typed_pct:.1f}%), "
          f"with a docstring {doc} ({doc_pct:.1f}%)")
    if args.list:
        print("untyped:", *untyped, sep="\n  ")
        print("undocumented:", *undocumented, sep="\n  ")
    if typed_pct < args.min_typed or doc_pct < args.min_doc:
        print(f"error: below the floor (typed {args.min_typed}%, documented {args.min_doc}%)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
