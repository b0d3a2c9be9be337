"""Errors every layer may raise for the commands to report, and the output-path checks that
raise them before any work starts."""
import os


class UserError(Exception):
    """Bad input from the user: printed as one line, never as a traceback (exit 2)."""


class RunFailed(Exception):
    """A run that cannot give a trustworthy number: a NaN or Inf in a loss, gradient or output,
    or a schedule or variant off its reference (exit 1)."""


def writable_file(path: str, what: str = "output") -> str:
    """Raises UserError unless `path` can be written as a file (it exists and is writable, or
    its nearest existing folder is writable). Creates nothing."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {what} {path}: it is a folder")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write {what} {path}: permission denied")
        return path
    return writable_folder(os.path.dirname(os.path.abspath(path)), what, path)


def writable_folder(folder: str, what: str = "output", shown: str | None = None) -> str:
    """Raises UserError unless `folder` exists as a writable folder or can be created (its
    nearest existing ancestor is a writable folder). Creates nothing."""
    shown = shown or folder
    d = os.path.abspath(folder)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UserError(f"cannot write {what} {shown}: {d} is not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {shown}: {d} is not writable")
    return folder

