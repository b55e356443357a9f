"""The compression methods there are, read from their own modules without importing them.

Each method module in :mod:`carddeck.compress` declares what the rest of the code must know about it
beside its code, as literals::

    SPEC = MethodSpec(
        name="lrr",
        summary="iterative magnitude pruning + LR rewinding",
        export_format="sparse",
        options=(Option("prune_fraction", "float", 0.2, "fraction of remaining weights per round"),),
    )

Method modules import torch; the serving path (CardMeta validation) and ``carddeck compress --help``
must not. So this module reads the declarations from the modules' source (``ast``: literals only, no
code runs) and the runtime registry (:data:`carddeck.compress.METHODS`) imports the modules it names;
a test checks that both agree. A new method is one module: the CLI, CardMeta and export follow.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carddeck.errors import InvalidInput
from carddeck.registry import plugin_path

OPTION_TYPES = {"float": float, "int": int, "str": str}


@dataclass(frozen=True)
class Option:
    """A method's own setting: a ``MethodConfig`` option and the ``--flag`` of ``carddeck compress``."""

    name: str  # python name; the flag is --name-with-dashes
    type: str  # float, int or str
    default: Any
    help: str
    exclusive: str = ""  # options with the same label may not be given together

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the registry name, CardMeta's compression.method
    summary: str  # one line for the command's help
    export_format: str  # how its cards are stored: dense, sparse or binary (carddeck.export.formats)
    options: tuple[Option, ...] = ()
    epochs: int = 10  # the default of --epochs: training methods train; one-shot methods retrain briefly (1)
    module: str = ""  # filled by the reader: the module that declares it


def _literal(node: ast.expr, source: str) -> Any:
    """A declaration's value: literals, and Option(...) / MethodSpec(...) calls with literal arguments."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Option", "MethodSpec"):
        cls = Option if node.func.id == "Option" else MethodSpec
        args = [_literal(a, source) for a in node.args]
        kwargs = {k.arg: _literal(k.value, source) for k in node.keywords if k.arg is not None}
        return cls(*args, **kwargs)
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_literal(e, source) for e in node.elts)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise InvalidInput(f"{source}:{node.lineno}: a method declaration holds literals only") from None


def method_dirs() -> list[Path]:
    """The folders of ``carddeck.compress``: the package's own, and ``carddeck/compress`` elsewhere on sys.path."""
    spec = importlib.util.find_spec("carddeck.compress")  # finds the package without running its __init__
    own = list(spec.submodule_search_locations or []) if spec is not None else []
    return [Path(d) for d in plugin_path(own, "carddeck.compress")]


@functools.cache
def method_specs() -> dict[str, MethodSpec]:
    """Every declared method, by name."""
    found: dict[str, MethodSpec] = {}
    for folder in method_dirs():
        for path in sorted(folder.glob("*.py")):
            text = path.read_text()
            if "MethodSpec(" not in text:
                continue
            for node in ast.parse(text, str(path)).body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                    spec = _literal(node.value, str(path)) if _is_spec(node.value) else None
                    if spec is not None:
                        found[spec.name] = MethodSpec(**{**spec.__dict__, "module": path.stem})
    return dict(sorted(found.items()))


def _is_spec(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id == "MethodSpec"


def method_names() -> tuple[str, ...]:
    return tuple(method_specs())


def method_spec(name: str) -> MethodSpec:
    specs = method_specs()
    if name not in specs:
        raise InvalidInput(f"unknown compression method {name!r}; valid choices: {', '.join(specs)}")
    return specs[name]


def method_options() -> dict[str, tuple[Option, tuple[str, ...]]]:
    """Every method option by name, with the methods that declare it (one option may serve several)."""
    options: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for spec in method_specs().values():
        for option in spec.options:
            known, users = options.get(option.name, (option, ()))
            if (known.type, known.default, known.exclusive) != (option.type, option.default, option.exclusive):
                raise InvalidInput(f"option {option.name!r}: methods {users[0]} and {spec.name} declare it differently")
            options[option.name] = (known, (*users, spec.name))
    return options


__all__ = ["MethodSpec", "Option", "method_names", "method_options", "method_spec", "method_specs"]
