"""Reading a spec: TOML text or file -> ``--set`` overrides -> validated ``Spec``, with every user error
collected; relative paths resolved against the spec's folder; the spec's hash and JSON Schema.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from .models import Spec, SpecError
from .rules import _loc, _pydantic_problems, _semantic_problems

def parse_spec(text: str, source: str = "<spec>", sets: Sequence[str] = ()) -> Spec:
    """Return the validated ``Spec`` of TOML ``text``; raise ``SpecError`` naming every problem.

    ``sets`` are ``dotted.path=value`` overrides (``--set``) applied to the parsed TOML before
    validation (see ``apply_sets``). Relative paths stay as written: ``load_spec`` resolves them
    against the spec file's folder.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if where:
            body = msg[: where.start()].strip()
            raise SpecError(f"{source}:{where.group(1)}:{where.group(2)}", [("", f"TOML syntax error: {body}")]) from None
        raise SpecError(source, [("", f"TOML syntax error: {msg}")]) from None
    return validate_raw(apply_sets(raw, sets, source), source)


def validate_raw(raw: dict[str, Any], source: str = "<spec>") -> Spec:
    """Return the validated ``Spec`` of parsed TOML ``raw``; raise ``SpecError`` naming every problem."""
    problems: list[tuple[str, str]] = []
    spec = None
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
    problems += _semantic_problems(raw)
    if problems:
        raise SpecError(source, list(dict.fromkeys(problems)))
    assert spec is not None
    return spec


MAX_SPEC_BYTES = 1 << 20


def load_spec(path: str | Path, sets: Sequence[str] = ()) -> tuple[Spec, str]:
    """Return the validated spec at ``path`` (``sets`` applied, paths resolved) and its raw text.

    Every relative path in a spec (``output.dir``, ``reference.image``, ``reference.scenes[k].image``)
    is relative to the spec file's folder, wherever otherview is run from; the returned spec holds
    them absolute (see ``resolve_paths``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(str(path), [("", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError(str(path), [("", "is a directory, not a spec file")]) from None
    except OSError as exc:
        raise SpecError(str(path), [("", f"cannot be read ({exc.strerror or exc})")]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), [("", f"larger than {MAX_SPEC_BYTES // 1024} KiB: not a spec")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(str(path), [("", "not UTF-8 text")]) from None
    return resolve_paths(parse_spec(text, str(path), sets), path.parent), text


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(spec: Spec, base: str | Path) -> Spec:
    """Return ``spec`` with ``output.dir`` and every reference image made absolute against folder ``base``.

    Nothing is checked here: an image is opened and checked when the run starts.
    """
    base = Path(base).resolve()
    ref = spec.reference
    update: dict[str, Any] = {}
    if ref.image is not None:
        update["image"] = _resolve(ref.image, base)
    if ref.scenes is not None:
        update["scenes"] = [sc.model_copy(update={"image": _resolve(sc.image, base)}) if sc.image is not None else sc
                            for sc in ref.scenes]
    output = spec.output.model_copy(update={"dir": _resolve(spec.output.dir, base)})
    return spec.model_copy(update={"reference": ref.model_copy(update=update), "output": output})


_SET = re.compile(r"^\s*([A-Za-z0-9_-]+(?:\[\d+\])*(?:\.[A-Za-z0-9_-]+(?:\[\d+\])*)*)\s*=(.*)$", re.S)


def parse_set(assignment: str) -> tuple[list[str | int], Any]:
    """Return the path (keys and array indices) and the value of one ``dotted.path=value`` override.

    The value is read as a TOML literal (``8`` an integer, ``"8"`` a string, ``[2.0, 4.0]`` an array,
    ``true`` a boolean); text that is no TOML literal (``builtin:tiny``) is taken as a string.
    Raise ``ValueError`` for a malformed path.
    """
    m = _SET.match(assignment)
    if not m:
        raise ValueError("should be dotted.path=value (e.g. probe.batch_size=8 or axis.fillers[0].value=\"a cat\")")
    path: list[str | int] = []
    for part in m.group(1).split("."):
        key, *indices = re.split(r"\[", part)
        path.append(key)
        path += [int(i.rstrip("]")) for i in indices]
    text = m.group(2).strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return path, value


def apply_sets(raw: dict[str, Any], sets: Sequence[str | tuple[str, Any]], source: str = "<spec>") -> dict[str, Any]:
    """Return a copy of the parsed TOML ``raw`` with each override of ``sets`` applied, in order.

    An override is ``"dotted.path=value"`` (the value read by ``parse_set``) or a pair
    ``("dotted.path", value)`` whose value is used as given. Missing tables on the way are created;
    array items must exist. Raise ``SpecError`` naming each malformed override (``--set <it>: message``).
    """
    raw = copy.deepcopy(raw)
    problems = []
    for item in sets:
        assignment = item if isinstance(item, str) else f"{item[0]}={item[1]!r}"
        try:
            path, value = parse_set(assignment)
            if not isinstance(item, str):
                path, value = parse_set(f"{item[0]}=0")[0], item[1]
            node: Any = raw
            for k, key in enumerate(path[:-1]):
                nxt = path[k + 1]
                if isinstance(key, int):
                    if not isinstance(node, list) or not -len(node) <= key < len(node):
                        raise ValueError(f"{_loc(tuple(path[:k + 1]))} is not an existing array item")
                elif not isinstance(node, dict):
                    raise ValueError(f"{_loc(tuple(path[:k]))} is not a table")
                elif key not in node:
                    node[key] = [] if isinstance(nxt, int) else {}
                node = node[key]
            last = path[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or not -len(node) <= last < len(node):
                    raise ValueError(f"{_loc(tuple(path))} is not an existing array item")
            elif not isinstance(node, dict):
                raise ValueError(f"{_loc(tuple(path[:-1]))} is not a table")
            node[last] = value
        except ValueError as exc:
            problems.append((f"--set {assignment.strip()}", str(exc)))
    if problems:
        raise SpecError(source, problems)
    return raw


def with_sets(spec: Spec, sets: Sequence[str | tuple[str, Any]], source: str = "<spec>") -> Spec:
    """Return ``spec`` with overrides applied (as ``apply_sets``) and validated again, every check included."""
    if not sets:
        return spec
    return validate_raw(apply_sets(spec.model_dump(mode="json", exclude_none=True), sets, source), source)


def spec_hash(spec: Spec) -> str:
    """Return the SHA-256 of the resolved spec (canonical JSON), the id a run is traced by."""
    canon = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def with_overrides(spec: Spec, overrides: dict[str, Any]) -> Spec:
    """Return ``spec`` with ``{"section.key": value}`` overrides applied (None values are skipped)."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".")
        part = getattr(spec, section).model_copy(update={key: value})
        spec = spec.model_copy(update={section: part})
    return spec


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a spec, for editors and validators.

    Generated from the same models as validation, with a description on every field, strict types
    and the cross-field rules a schema can express (exactly one of ``reference.prompt``/``image``/
    ``scenes`` and of a scene's ``prompt``/``image``; ``[contrast]`` or ``[[contrasts]]``; a contrast's
    ``weights`` or ``a`` and ``b``; names in ``[[contrasts]]``; no specificity test with ``[contrast]``;
    condition names; distinct seeds and wordings; known placeholders in ``output.dir``). What only
    ``otherview validate`` checks is listed in the README (and tested in ``tests/test_schema_cli.py``).
    """
    schema = Spec.model_json_schema()
    return {"$schema": SCHEMA_DIALECT, **schema}
