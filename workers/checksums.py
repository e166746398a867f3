"""`SHA256SUMS`: the integrity manifest of a model version directory.

The file lists every other file of the directory in `sha256sum` format (`<hex>  <name>`), so
`sha256sum -c SHA256SUMS` checks a version by hand too. A version whose files differ from the
list in any way (a changed byte, a missing, extra or nested file) is refused. Writers create
a version under a temporary name and rename it into place once the list is written, so its
presence also says that the version is complete.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from workers.errors import ModelLoadError

CHECKSUMS_FILENAME = "SHA256SUMS"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *]([^/\\\x00]+)$")


class IntegrityError(ModelLoadError):
    """A version directory whose files do not match its `SHA256SUMS`."""

    reason = "checksums"


class IncompleteVersionError(ModelLoadError):
    """A version directory without `SHA256SUMS`: still being written, or never finished."""

    reason = "incomplete"


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_checksums(version_dir: Path) -> dict[str, str]:
    """File name → hex SHA-256 for every file of ``version_dir`` but `SHA256SUMS` itself."""
    sums: dict[str, str] = {}
    for entry in sorted(version_dir.iterdir()):
        if entry.name == CHECKSUMS_FILENAME:
            continue
        if not entry.is_file() or entry.is_symlink():
            raise IntegrityError(f"{entry} is not a plain file: a version holds plain files only")
        sums[entry.name] = sha256_file(entry)
    return sums


def write_checksums(version_dir: Path) -> Path:
    """Write ``version_dir``'s `SHA256SUMS` over its files; return its path."""
    sums = compute_checksums(version_dir)
    path = version_dir / CHECKSUMS_FILENAME
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return path


def read_checksums(version_dir: Path) -> Mapping[str, str]:
    """The listed name → hex SHA-256; IncompleteVersionError without the file."""
    path = version_dir / CHECKSUMS_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IncompleteVersionError(f"{version_dir} has no {CHECKSUMS_FILENAME}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise IntegrityError(f"cannot read {path}: {error}") from error
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.match(line)
        if match is None:
            raise IntegrityError(f"{path} line {number} is not `<sha256>  <file name>`")
        digest, name = match.groups()
        if name in sums or name == CHECKSUMS_FILENAME:
            raise IntegrityError(f"{path} line {number} lists {name!r} again")
        sums[name] = digest
    return sums


def verify_checksums(version_dir: Path) -> Mapping[str, str]:
    """Check every file of ``version_dir`` against its `SHA256SUMS`; return the listing.

    IncompleteVersionError without the file, IntegrityError on any difference.
    """
    expected = read_checksums(version_dir)
    actual = compute_checksums(version_dir)
    missing = sorted(set(expected) - set(actual))
    unlisted = sorted(set(actual) - set(expected))
    changed = sorted(name for name in expected.keys() & actual.keys()
                     if expected[name] != actual[name])  # fmt: skip
    if missing or unlisted or changed:
        parts = [
            f"{what} {names}"
            for what, names in (("changed", changed), ("missing", missing), ("unlisted", unlisted))
            if names
        ]
        raise IntegrityError(f"{version_dir} does not match its {CHECKSUMS_FILENAME}: "
                             + "; ".join(parts))  # fmt: skip
    return expected
