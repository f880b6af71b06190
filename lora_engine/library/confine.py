"""Names typed into a front-end, kept inside the folders it was given.

A typed name is relative to a folder, written with ``/`` or ``\\``. The rule is the library's
name rule (:func:`lora_engine.library.index.check_name` uses :func:`normalise`): absolute paths,
drive letters, ``..`` parts and NUL are refused before anything touches the disk.

* Reading (:func:`find_path`, :func:`read_path`): the name must exist under one of the folders, and its real path
  (every symlink resolved) must lie inside the real path of one of them; a link that leads out
  is refused without opening its target.
* Writing (:func:`write_path`): the parent folder must already exist and lie (real path) inside
  the real output folder, and the name itself must not be a symlink (writing would change the
  link's target). Whether an existing file may be replaced is the caller's rule.

Messages name the typed text and the folders, never anything read from a file.
"""
from __future__ import annotations

import os
import re

from ..errors import PathRefusedError

_DRIVE_RE = re.compile(r"[A-Za-z]:")


def normalise(name: str) -> str | None:
    """``name`` with ``\\`` as ``/`` and no empty or ``.`` parts, or None when it could leave a
    folder (absolute, a drive letter, a ``..`` part, NUL)."""
    n = name.strip().replace("\\", "/")
    if "\x00" in n or n.startswith("/") or _DRIVE_RE.match(n) or ".." in n.split("/"):
        return None
    return "/".join(p for p in n.split("/") if p not in ("", "."))


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both already absolute and normalised)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def relative(name, what: str) -> str:
    """The normalised name, or :class:`PathRefusedError` (naming ``what``) when it is empty or could
    leave a folder."""
    text = name if isinstance(name, str) else ""
    n = normalise(text) if text.strip() else ""
    if n is None:
        raise PathRefusedError(f"{what} {text!r} refused: give a name inside the folder, not an absolute path, "
                               "a drive or '..'")
    if not n:
        raise PathRefusedError(f"no {what} given")
    return n


def _real_folders(folders) -> list[str]:
    return [os.path.realpath(f) for f in folders]


def find_path(name: str, folders, what: str) -> str | None:
    """The existing path ``name`` means below one of ``folders`` (searched in order), or None."""
    n = relative(name, what)
    folders = [os.path.abspath(f) for f in folders if f]
    for folder in folders:
        path = os.path.join(folder, *n.split("/"))
        if os.path.lexists(path):
            real = os.path.realpath(path)
            if not any(inside(real, r) for r in _real_folders(folders)):
                raise PathRefusedError(f"{what} {name!r} refused: it links outside {_listed(folders)}")
            return path
    return None


def read_path(name: str, folders, what: str) -> str:
    """:func:`find_path`, refusing a name that is not there."""
    path = find_path(name, folders, what)
    if path is None:
        raise PathRefusedError(f"{what} {name!r} not found in {_listed(folders)}")
    return path


def write_path(name: str, folder: str, what: str) -> str:
    """Where ``name`` is written below ``folder`` (see the module's rule; nothing is created)."""
    n = relative(name, what)
    folder = os.path.abspath(folder)
    path = os.path.join(folder, *n.split("/"))
    parent = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise PathRefusedError(f"the output folder {folder} does not exist")
    if not os.path.isdir(parent):
        raise PathRefusedError(f"{what} {name!r} refused: folder {os.path.dirname(n)!r} does not exist in {folder}")
    if not inside(os.path.realpath(parent), os.path.realpath(folder)):
        raise PathRefusedError(f"{what} {name!r} refused: it links outside {folder}")
    if os.path.islink(path):
        raise PathRefusedError(f"{what} {name!r} refused: it is a symlink (writing would change its target)")
    return path


def _listed(folders) -> str:
    return ", ".join(folders) if folders else "no configured folder"
