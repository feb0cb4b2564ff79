"""Reading user files with one-line errors, and writing output files atomically."""

import json
import os
import tempfile
from pathlib import Path

import yaml

from nfsearch.errors import NfsearchError


def read_yaml(path: str | Path) -> dict:
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise NfsearchError(f"{path}: malformed YAML ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise NfsearchError(f"{path}: expected a YAML mapping at the top level")
    return data


def read_json(path: str | Path) -> dict:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NfsearchError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise NfsearchError(f"{path}: expected a JSON object at the top level")
    return data


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise NfsearchError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise NfsearchError(f"{path}: cannot read ({type(exc).__name__})") from None


def write_atomic(path: str | Path, write_to) -> None:
    """Call write_to(tmp_path) and move the result over `path` only if it succeeds."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise NfsearchError(f"{path}: cannot write (no directory {directory})")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise NfsearchError(f"{path}: cannot write ({exc.strerror})") from None
    os.close(fd)
    try:
        write_to(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise NfsearchError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
