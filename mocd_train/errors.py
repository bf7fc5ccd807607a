"""The project's exception types: a leaf module that every other module may import (it imports nothing)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or command-line mistake; the message names the key and how to fix it."""


class NonFiniteError(ValueError):
    """A NaN or ±inf reached the decoding math; the message says where it came from (prompt, block, objective)."""


class WeightSolveError(RuntimeError):
    """The worst-case weight solve did not reach its certificate for some prompts (`rows`)."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows
