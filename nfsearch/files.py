"""Reading user files with one-line errors, and writing output files atomically.

Every reader refuses, with one NfsearchError line and in bounded time, what would otherwise crash
or hang code further in: a folder or device instead of a file, a file over MAX_INPUT_BYTES, bytes
that are not UTF-8, nesting deeper than MAX_DEPTH, numbers Python will not parse (5,000 digits),
JSON's non-standard NaN/Infinity, duplicate keys, and text with lone surrogates or other code
points UTF-8 cannot encode (they crash matplotlib and the JSON writers later).
"""

import json
import math
import os
import stat
import tempfile
from pathlib import Path

import yaml

from nfsearch.errors import NfsearchError

MAX_INPUT_BYTES = 64 * 2**20      # the largest input file read (plans of many layers stay far below)
MAX_DEPTH = 64                    # nesting of lists/mappings; our formats use fewer than 8 levels

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)     # libyaml: fast on big files


class _StrictYamlLoader(_YAML_LOADER):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    is_duplicate = key in seen
                    seen.add(key)
                except TypeError:          # an unhashable key: let the base class report it
                    break
                if is_duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shown(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    text = read_text(path)
    try:
        _check_yaml_depth(text, shown(path))
        data = yaml.load(text, Loader=_StrictYamlLoader)
    except yaml.YAMLError as exc:
        raise NfsearchError(f"{shown(path)}: malformed YAML ({_first_line(exc)})") from None
    except RecursionError:
        raise NfsearchError(f"{shown(path)}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:          # e.g. an integer of thousands of digits
        raise NfsearchError(f"{shown(path)}: bad value in YAML ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise NfsearchError(f"{shown(path)}: expected a YAML mapping at the top level")
    check_tree(data, shown(path))
    return data


def _check_yaml_depth(text: str, where: str) -> None:
    """Refuse deep nesting from the parser's event stream (libyaml keeps its own stack), before
    the composer, which recurses on the C stack and crashes the process on deep input."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise NfsearchError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def read_json(path: str | Path) -> dict:
    return parse_json(read_text(path), shown(path))


def parse_json(text: str, where: str) -> dict:
    """A JSON object from `text`, with the checks every reader makes (see the module docstring)."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise NfsearchError(f"{where}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise NfsearchError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:          # our hooks, and int() past its digit limit
        raise NfsearchError(f"{where}: bad value in JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise NfsearchError(f"{where}: expected a JSON object at the top level")
    check_tree(data, where)
    return data


def check_tree(data, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings UTF-8 cannot encode (lone surrogates).

    Iterative, and each container is visited once: YAML aliases can share one list many times."""
    stack, seen = [(data, 1)], set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_utf8(item):
                raise NfsearchError(f"{where}: text {shown(item)} is not valid unicode (lone surrogate)")
            continue
        if not isinstance(item, (dict, list, tuple, set, frozenset)) or id(item) in seen:
            continue
        if depth > MAX_DEPTH:
            raise NfsearchError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        seen.add(id(item))
        children = [x for kv in item.items() for x in kv] if isinstance(item, dict) else list(item)
        stack.extend((child, depth + 1) for child in children)


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise NfsearchError(f"{shown(path)}: no such file") from None
    except OSError as exc:
        raise NfsearchError(f"{shown(path)}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(info.st_mode):
        raise NfsearchError(f"{shown(path)}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise NfsearchError(f"{shown(path)}: not a regular file")
    if info.st_size > MAX_INPUT_BYTES:
        raise NfsearchError(f"{shown(path)}: larger than {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INPUT_BYTES + 1)     # the file may have grown since stat
    except OSError as exc:
        raise NfsearchError(f"{shown(path)}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise NfsearchError(f"{shown(path)}: larger than {MAX_INPUT_BYTES // 2**20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NfsearchError(f"{shown(path)}: not UTF-8 text (bad byte at offset {exc.start})") from None


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(value, limit: int = 80) -> str:
    """`value` as text safe to print on one line: escaped, and cut to `limit` characters."""
    text = str(value)
    if not text.isprintable():         # control characters, lone surrogates (category Cs), ...
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_atomic(path: str | Path, write_to) -> None:
    """Call write_to(tmp_path) and move the result over `path` only if it succeeds."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise NfsearchError(f"{shown(path)}: cannot write (no directory {shown(directory)})")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise NfsearchError(f"{shown(path)}: cannot write ({exc.strerror})") from None
    os.close(fd)
    try:
        write_to(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise NfsearchError(f"{shown(path)}: cannot write ({exc.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {shown(text, 24)} is out of range")
    return value


def _unique_keys(pairs: list) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {shown(key)}")
    return data


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    if "integer string conversion" in text:      # Python's int() digit limit
        return "a number with thousands of digits"
    return shown(text.splitlines()[0], 160) if text else type(exc).__name__
