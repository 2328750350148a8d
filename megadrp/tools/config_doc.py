"""docs/config.md, generated from the run config's own dataclasses (megadrp/config.py): every key,
its type, its default and the docstring written under the field, so the reference cannot drift
from the code (a test compares the file with this output).

    python -m megadrp.tools.config_doc            # print
    python -m megadrp.tools.config_doc --write    # write docs/config.md (from a checkout)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from megadrp.config import Config

HEADER = """# Config reference

Generated from `megadrp/config.py` by `python -m megadrp.tools.config_doc --write`; a test keeps
it equal to the code. A run config is YAML with these sections; unknown keys and wrong types are
errors naming the key. `dotted.key=value` arguments after `--config` override it (the value is
parsed as YAML: `train.steps=10`, `domains=[code,math]`, `dro.initial_proportion=null`). The
resolved config is written to `RUN_DIR/config.yaml`. The shipped recipes are in `configs/`.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of `cls` and of its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return " \\| ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"map[{_type(args[0])} → {_type(args[1])}]"
    if dataclasses.is_dataclass(t):
        return "section"
    return getattr(t, "__name__", str(t))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(v):
            return "below"
    else:
        return "**required**"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return f"`{v}`"


def _sections(cls: type, prefix: str, out: list[tuple[str, type]]) -> None:
    out.append((prefix, cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(a)]
        for sub in inner:
            _sections(sub, f"{prefix}.{f.name}" if prefix else f.name, out)


def render() -> str:
    sections: list[tuple[str, type]] = []
    _sections(Config, "", sections)
    parts = [HEADER]
    for prefix, cls in sections:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        title = f"`{prefix}`" if prefix else "Top level"
        parts += [f"## {title}", "", " ".join((cls.__doc__ or "").split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            doc = docs.get(f.name, "")
            parts.append(f"| `{key}` | {_type(hints[f.name])} | {_default(f)} | {doc} |")
        parts.append("")
    return "\n".join(parts)


def undocumented() -> list[str]:
    """Keys whose field has no docstring (a test keeps this empty)."""
    sections: list[tuple[str, type]] = []
    _sections(Config, "", sections)
    return [f"{p}.{f.name}" if p else f.name for p, cls in sections for f in dataclasses.fields(cls)
            if f.name not in field_docs(cls)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write docs/config.md of this checkout")
    args = ap.parse_args(argv)
    text = render()
    if not args.write:
        print(text)
        return 0
    from megadrp.runtime.files import atomic_write_text

    target = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    if not target.parent.is_dir():
        print(f"config_doc: {target.parent}: not a checkout's docs folder", file=sys.stderr)
        return 2
    atomic_write_text(target, text)
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
