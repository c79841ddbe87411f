"""Names read from files (index shard names, manifest entries, listed keys) confined to their directory."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from npuflow.core.errors import UnsafeNameError


def check_name(name: object, *, source: str) -> str:
    """`name` when it is a plain relative POSIX path that stays inside its directory, else UnsafeNameError.

    Refused: empty names, absolute paths, drive letters, backslashes, NUL, and `.`/`..`/empty parts.
    `source` names the file (or listing) the name was read from, for the message.
    """
    bad = None
    if not isinstance(name, str) or not name:
        bad = "not a non-empty string"
    elif "\x00" in name or "\\" in name:
        bad = "contains a NUL or a backslash"
    elif name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        bad = "is an absolute path"
    elif any(p in ("", ".", "..") for p in name.split("/")):
        bad = "has an empty, '.' or '..' part"
    if bad is not None:
        raise UnsafeNameError(
            f"{source} names {name!r}, which {bad}: every file it names must be a relative path inside "
            "its own directory. The file is corrupt or crafted; nothing was read or written. Fix or "
            "re-download it from a trusted source"
        )
    return name


def confined(root: Path, name: object, *, source: str) -> Path:
    """root / name, refusing a name that leads outside root (see check_name), before any read or write.

    The check is on the name as written in the file. Symbolic links already on disk are followed: a
    Hugging Face cache snapshot links each file into ../../blobs, and that layout is the user's own.
    """
    return root / check_name(name, source=source)


def check_names(names, *, source: str) -> None:
    """check_name for each of `names` (all checked before the caller reads or writes any)."""
    for n in names:
        check_name(n, source=source)
