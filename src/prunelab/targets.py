"""Classes of the user's own, named by a config node's `_target_` (Hydra's key): imported and called with the
node's other keys, each mistake (an import that fails, a wrong argument) a one-line `ConfigError` that names
the setting, before any work."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from prunelab.errors import ConfigError

# The key of a config node that names a class.
TARGET = "_target_"


def locate(path: str, setting: str) -> Any:
    """The object a dotted path names (`my_pkg.models.MyNet`).

    The longest importable module prefix is imported and the rest read as attributes, so a class nested in
    a class resolves too. An error raised while importing the user's module (a missing dependency, a bug)
    is shown as itself, in one line.
    """
    parts = str(path).split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{setting}={path!r} is not a dotted path to a class, such as my_pkg.MyNet")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Only the module named here is missing: try a shorter prefix (the rest may be attributes).
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                continue
            raise ConfigError(f"{setting}={path}: importing {name} failed: {err}") from None
        except Exception as err:  # noqa: BLE001  (whatever the user's module raises is reported in one line)
            raise ConfigError(f"{setting}={path}: importing {name} failed: {type(err).__name__}: {err}") from None
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                raise ConfigError(f"{setting}={path}: module {found.__name__} has no {attribute!r}")
            found = getattr(found, attribute)
        return found
    raise ConfigError(
        f"{setting}={path}: no module {parts[0]!r} can be imported (install it, or put the folder that holds it on "
        "PYTHONPATH)"
    )


def parameters(factory: Any) -> dict[str, inspect.Parameter]:
    """The named parameters a class or function takes (none known for a builtin without a signature)."""
    try:
        found = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p for name, p in found.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def call(
    node: dict[str, Any], setting: str, offered: dict[str, Any] | None = None, hint: str = ""
) -> tuple[Any, dict[str, Any]]:
    """`node[_target_](**arguments)`: the node's other keys, plus each `offered` one the target takes by name and
    the node does not set. Returns the object and the arguments it was called with.

    Arguments the target does not take, or required ones missing, are a `ConfigError` naming `setting`, what the
    target takes and `hint`; errors raised inside the target's constructor are its own.
    """
    arguments = {k: v for k, v in node.items() if k != TARGET}
    target = node[TARGET]
    factory = locate(target, f"{setting}.{TARGET}")
    takes = parameters(factory)
    for name, value in (offered or {}).items():
        if name in takes and name not in arguments:
            arguments[name] = value
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as err:
        raise ConfigError(
            f"{setting}.{TARGET}={target}: {err} (it takes: {', '.join(takes) or 'no arguments'}){hint}"
        ) from None
    except ValueError:
        pass  # No signature to check against (a builtin): the call itself says what is wrong.
    return factory(**arguments), arguments
