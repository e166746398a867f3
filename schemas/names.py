"""Model names and versions: what may name a model, checked wherever a name comes in.

A model name is also a directory of the model repository and part of topic names, so it must
not be able to name a path. Kept free of numpy and torch: the supervisor imports it.
"""

from __future__ import annotations

import argparse
import re
from typing import Final

from schemas.errors import InvalidModelNameError

MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
"""A model name: 1 to 200 of `[A-Za-z0-9._-]`, a letter or digit first (a model name is also
a directory of the model repository and part of a topic name, so `.`, `..` and `-x` are out)."""
INT64_MAX: Final = 2**63 - 1

_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def is_model_name(name: object) -> bool:
    """Whether ``name`` is a model name (the whole of it: `fullmatch`, no trailing newline)."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: object) -> str:
    """``name`` if it is a model name, else `InvalidModelNameError`; every entry point that
    takes a model name from outside (a request, a CLI, the client, a directory) checks it."""
    if not is_model_name(name):
        raise InvalidModelNameError(
            f"model: {name!r} is not a model name (1 to 200 of [A-Za-z0-9._-], a letter or "
            "digit first): a model name cannot name a path"
        )
    assert isinstance(name, str)
    return name


def check_model_version(version: object) -> int:
    """``version`` if it is a positive int64 (not a bool, not a string), else
    `InvalidModelNameError`."""
    if type(version) is not int or not 1 <= version <= INT64_MAX:
        raise InvalidModelNameError(f"version: {version!r} is not a positive integer")
    return version


def model_name_argument(text: str) -> str:
    """`argparse` type of a model name argument: the name, or a usage error saying why."""
    try:
        return check_model_name(text)
    except InvalidModelNameError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def version_argument(text: str) -> int:
    """`argparse` type of a version argument: a positive decimal integer."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"version: {text!r} is not a positive integer")
    return int(text)
