"""The project's exception types: a leaf module that every other module may import (it imports nothing).

Every one of them is a `MocdError`: a mistake or a problem the user can act on, whose message names it and the fix.
The stage scripts print such errors as one line and exit 2 (`cli.run_stage`; MOCD_DEBUG=1 shows the traceback)."""

from __future__ import annotations


class MocdError(Exception):
    """A problem the message explains, with its fix."""


class ConfigError(MocdError, ValueError):
    """A recipe or command-line mistake; the message names the key and how to fix it."""


class NonFiniteError(MocdError, ValueError):
    """A NaN or ±inf reached the decoding math; the message says where it came from (prompt, block, objective)."""


class WeightSolveError(MocdError, RuntimeError):
    """The worst-case weight solve did not reach its certificate for some prompts (`rows`)."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows
