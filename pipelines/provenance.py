"""Which code produced an artifact: recorded in checkpoints and on registered model versions."""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path

# Set by `mvit submit` from the submitting checkout: a Ray job runs an upload of the working dir without .git.
CODE_VERSION_ENV = "MVIT_CODE_VERSION"
PACKAGE = "mvit-system"


@functools.cache
def code_version() -> str:
    """`git:<commit>` of the checkout this code runs from (`+dirty` when tracked files differ from it),
    else $MVIT_CODE_VERSION, else `mvit-system==<installed version>`."""
    found = git_version(Path(__file__).resolve().parent.parent)
    if found:
        return found
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    try:
        return f"{PACKAGE}=={metadata.version(PACKAGE)}"
    except metadata.PackageNotFoundError:
        return "unknown"


def git_version(directory: Path) -> str:
    """`git:<commit>[+dirty]` when `directory` is the top of a git work tree ("" otherwise)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != directory.resolve():
            return ""  # installed inside some other repository: its commit says nothing about this code
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"git:{commit}" + ("+dirty" if dirty else "")
