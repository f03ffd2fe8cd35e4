"""The errors prunelab raises for the user to act on: a leaf module, imported by every layer that raises one.

A `PrunelabError` is shown as one line, without a traceback (the `prunelab` command prints `prunelab: error: ...`
and exits with code 2 for a `ConfigError`).
"""

from __future__ import annotations


class PrunelabError(Exception):
    """An error the user can act on: shown as one line, without a traceback."""


class ConfigError(PrunelabError, ValueError):
    """A setting that cannot work, found before (or instead of) any work."""


class NonFiniteError(PrunelabError, ArithmeticError):
    """A loss, gate, score or metric became NaN or infinite: the run stops, nothing after it is done."""


class BudgetError(ConfigError):
    """The requested budget cannot be met (it says how close it got and why)."""


class UnprunableError(ConfigError):
    """Removing some channel group's channels breaks the model: found before any training, said in one line."""


def user_error(err: BaseException) -> PrunelabError | None:
    """The `PrunelabError` behind an exception, looking through Hydra's instantiation wrappers."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PrunelabError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
