"""What the service refuses in a spec beyond JobSpec's own validation.

Dataset paths (``data.root``, ``data.path``) must lie inside the operator's data root. Relative
paths are resolved against the working directory, as the trainer resolves them, so the API and
the workers must share it (or the operator sets an absolute BYOL_DATA_ROOT and specs use
absolute paths). ``~`` is expanded and symlinks are followed: a link inside the root that leads
outside it is refused.

Every value must also be storable: PostgreSQL refuses NUL characters and JSON's NaN and
Infinity, and JSON may carry lone UTF-16 surrogates that cannot be encoded; each would otherwise
fail at INSERT time as a 500. (JobSpec, and a sweep's checks of its values against it, refuse
non-finite numbers first; this is the last look before the INSERT.)
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from byol_core.spec import JobSpec
from byol_core.sweep import SweepSpec


def resolved(path: str | Path) -> Path:
    return Path(os.path.expanduser(path)).resolve()


def inside(path: str, root: Path) -> bool:
    """What ``resolved(path).is_relative_to(root)`` says, on strings: Path objects cost a third
    of POST /jobs's admission time under load."""
    try:
        candidate = os.path.realpath(os.path.expanduser(path))
    except (OSError, ValueError):  # unresolvable, or a NUL byte: not provably inside
        return False
    try:
        os.stat(candidate)  # realpath leaves a symlink loop unresolved; stat reports it
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
    except ValueError:
        return False
    prefix = os.path.join(root, "")  # "/data/" for "/data", "/" for "/"
    return candidate == str(root) or candidate.startswith(prefix)


def paths_outside_root(spec: JobSpec | SweepSpec, root: Path) -> Iterator[tuple[str, str]]:
    """``root``: the data root, already resolved. A sweep is checked on its base's paths and on
    any dataset path its space chooses between."""
    prefix, data = ("base.", spec.base.data) if isinstance(spec, SweepSpec) else ("", spec.data)
    candidates = [("data.root", data.root), ("data.path", data.path)]
    if isinstance(spec, SweepSpec):
        for key in ("data.root", "data.path"):
            candidates += [(f"space.{key}", v) for v in spec.values_of(key) if isinstance(v, str)]
    for field, value in candidates:
        if value is not None and not inside(value, root):
            name = field if field.startswith("space.") else prefix + field
            yield name, f"must lie inside the data root {root} (got {value!r})"


def unstorable(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from unstorable(item, (*path, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from unstorable(item, (*path, str(index)))
    elif isinstance(value, float) and not math.isfinite(value):
        yield ".".join(path), f"must be a finite number (got {value})"
    elif isinstance(value, str):
        if "\x00" in value:
            yield ".".join(path), "must not contain NUL characters"
        else:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                yield ".".join(path), "must be valid Unicode text (lone surrogate)"


def problems(
    spec: JobSpec | SweepSpec, document: dict[str, Any], root: Path, canonical: str
) -> list[tuple[str, str]]:
    """(dotted field, message) for each refusal; ``document`` is the spec as it is stored,
    ``canonical`` its ``jobs.canonical`` JSON, ``root`` the resolved data root."""
    found = [] if storable(canonical) else list(unstorable(document))
    if not found:
        found = list(paths_outside_root(spec, root))
    return found


def storable(canonical: str) -> bool:
    """Whether every value of a spec can be stored, judged from its canonical JSON: that is
    ASCII, so it writes NUL as the escape u0000 and any character beyond the BMP, a lone
    surrogate included, with d800-dfff escapes, and a non-finite number as a bare NaN or
    Infinity. Without any of these there is nothing to refuse, and a spec with one (an emoji
    or the text "NaN", say) is walked by ``unstorable`` to find out."""
    return not any(mark in canonical for mark in ("\\u0000", "\\ud", "NaN", "Infinity"))
