"""Write a command's output into a folder without touching what the tool did not write.

:func:`owned_output` stages the new files in a hidden folder inside the target, and only once everything was
written replaces the files of the previous output of the same command (listed in the folder's marker file,
``.finegrained-<command>.json``) with them. A folder that holds anything else is refused with one line, and an
error half-way removes the staged files, so the target is either the previous output or the new one, never a mix,
and a user's files are never deleted or overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator, List


class OutputFolderError(ValueError):
    """The output folder holds files this tool did not write."""


def _marker(out_dir: str, command: str) -> str:
    return os.path.join(out_dir, f".finegrained-{command}.json")


def _files_below(folder: str) -> List[str]:
    """Every file below ``folder``, relative to it, sorted (links are files: never followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        found += [os.path.relpath(os.path.join(dirpath, name), folder) for name in filenames]
        found += [os.path.relpath(os.path.join(dirpath, name), folder) for name in dirnames
                  if os.path.islink(os.path.join(dirpath, name))]
    return sorted(found)


def previous_output(out_dir: str, command: str) -> List[str]:
    """The files the previous ``command`` wrote in ``out_dir`` (from its marker), or [] for an empty folder.

    Raises:
        OutputFolderError: ``out_dir`` holds files the marker does not list (or there is no marker).
    """
    if not os.path.exists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise OutputFolderError(f"{out_dir}: is a file; expected a folder for the {command} output")
    marker = _marker(out_dir, command)
    owned: List[str] = []
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                owned = [str(p) for p in json.load(f)["files"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OutputFolderError(f"{marker}: not a marker this tool wrote ({err}); move the folder aside") from None
        # The marker is a file like any other: it may only name files inside the folder (it is never followed out).
        outside = [p for p in owned if os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] in ("..", "")
                   or os.path.normpath(p) != p]
        if outside:
            raise OutputFolderError(f"{marker}: lists {outside[0]!r}, which is not a file inside {out_dir}; expected "
                                    f"the marker finegrained {command} writes (nothing was changed)")
    foreign = [p for p in _files_below(out_dir) if p not in owned and p != os.path.basename(marker)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputFolderError(f"{out_dir}: holds files finegrained {command} did not write ({shown}); choose a new "
                                f"or empty folder (nothing was changed)")
    return owned


@contextlib.contextmanager
def owned_output(out_dir: str, command: str) -> Iterator[str]:
    """Yield a staging folder for the new output of ``command``; on success it replaces the previous one in
    ``out_dir`` (see the module docstring), on an error it is removed and ``out_dir`` is left as it was."""
    previous = previous_output(out_dir, command)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = os.path.join(out_dir, f".finegrained-{command}-in-progress-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # ours: a previous attempt of this process
    os.makedirs(staging)
    try:
        yield staging
        written = _files_below(staging)
        for name in previous:
            path = os.path.join(out_dir, name)
            if os.path.lexists(path) and not os.path.isdir(path):
                os.remove(path)
        for name in written:
            target = os.path.join(out_dir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(staging, name), target)
        _remove_empty_folders(out_dir, {os.path.dirname(name) for name in previous})
        with open(_marker(out_dir, command), "w") as f:
            json.dump({"command": f"finegrained {command}", "files": written}, f, indent=1)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_empty_folders(out_dir: str, folders) -> None:
    """Folders the previous output used that are now empty (deepest first)."""
    for folder in sorted((f for f in folders if f), key=lambda f: -f.count(os.sep)):
        with contextlib.suppress(OSError):  # not empty: it holds new output
            os.rmdir(os.path.join(out_dir, folder))
