"""The cross-field rules pydantic cannot see (conditions, contrasts, scenes, seeds), and pydantic's
errors put in plain TOML words: each a list of ``(dotted path, message)``, every problem at once.
"""

from __future__ import annotations

import re
import string
from typing import Any

from pydantic import ValidationError

from .models import NAME

def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _template_slots(template: str) -> list[str]:
    """Return the slot names of ``template``; raise ValueError for anything but plain ``{name}`` slots."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    slots = []
    for literal, name, spec, conversion in parts:
        if "{" in literal or "}" in literal:
            raise ValueError("literal braces ('{{' or '}}') are not supported in a template")
        if name is None:
            continue
        if conversion or spec:
            raise ValueError(f"slot {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} has a "
                             f"conversion or format spec; write the plain slot {{{name}}}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"slot {{{name}}} is not a plain name; write {{slot}}")
        slots.append(name)
    return slots


def _table(raw: Any, key: str) -> dict:
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else {}


def _condition_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    conditions = _table(raw, "conditions")
    slot = _table(raw, "axis").get("slot")
    slot = slot if isinstance(slot, str) else None
    counts = {}
    for name, value in conditions.items():
        if not re.fullmatch(NAME, str(name)):
            problems.append((f"conditions.{name}", "a condition name must be an identifier (letters, digits, _ and -)"))
        templates = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        counts[name] = len(templates)
        for k, template in enumerate(templates):
            where = f"conditions.{name}" + (f"[{k}]" if isinstance(value, list) else "")
            if not isinstance(template, str):
                continue
            try:
                slots = _template_slots(template)
            except ValueError as exc:
                problems.append((where, str(exc)))
                continue
            if slot is not None and slot not in slots:
                problems.append((where, f"template never uses the axis slot {{{slot}}}"))
            for other in sorted(set(slots) - {slot}):
                if slot is not None:
                    problems.append((where, f"unknown slot {{{other}}} (the axis slot is {{{slot}}})"))
        if isinstance(value, list) and len(set(v for v in value if isinstance(v, str))) < len(value):
            problems.append((f"conditions.{name}", "repeats a wording"))
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        problems.append(("conditions", f"every condition needs the same number of wordings, paired by position ({listed})"))
    return problems


def _contrast_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    conditions = _table(raw, "conditions")
    has_one, many = "contrast" in raw, raw.get("contrasts")
    if has_one and many is not None:
        return [("contrasts", "give either [contrast] (one contrast) or [[contrasts]] (several), not both")]
    if not has_one and many is None:
        return [("contrasts", "required: at least one contrast ([contrast] a/b, or [[contrasts]] with name and weights)")]
    entries = [("contrast", raw["contrast"])] if has_one else \
        [(f"contrasts[{i}]", c) for i, c in enumerate(many)] if isinstance(many, list) else []
    names: dict[str, str] = {}
    used: set[str] = set()
    for where, c in entries:
        if not isinstance(c, dict):
            continue
        name = c.get("name")
        if where != "contrast" and name is None:
            problems.append((f"{where}.name", "required key is missing"))
        if isinstance(name, str):
            if name in names:
                problems.append((f"{where}.name", f"'{name}' repeats {names[name]}"))
            names.setdefault(name, where)
        has_ab = "a" in c or "b" in c
        if has_ab == ("weights" in c):
            problems.append((where, "give either 'weights' or 'a' and 'b'"))
            continue
        if has_ab:
            for side in ("a", "b"):
                if side not in c:
                    problems.append((f"{where}.{side}", "required key is missing"))
            weights = {c.get("a"): 1.0, c.get("b"): -1.0} if c.get("a") != c.get("b") else {}
            if isinstance(c.get("a"), str) and c.get("a") == c.get("b"):
                problems.append((f"{where}.b", f"must differ from {where}.a"))
            keys = [(f"{where}.{side}", c.get(side)) for side in ("a", "b")]
        else:
            weights = c.get("weights") if isinstance(c.get("weights"), dict) else {}
            keys = [(f"{where}.weights.{k}", k) for k in weights]
            values = [v for v in weights.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(values) == len(weights):
                nonzero = [v for v in values if v != 0]
                if len(nonzero) < 2:
                    problems.append((f"{where}.weights", "needs at least two conditions with nonzero weights"))
                elif abs(sum(values)) > 1e-9 * max(abs(v) for v in values):
                    problems.append((f"{where}.weights", f"weights must sum to 0 (they sum to {sum(values):g}): a "
                                                         "contrast compares conditions"))
        for path, key in keys:
            if isinstance(key, str) and conditions and key not in conditions:
                problems.append((path, f"unknown condition '{key}' (known: {', '.join(sorted(conditions))})"))
        used |= {k for k, v in weights.items() if isinstance(k, str) and v != 0}
    unknown = any(m.startswith("unknown condition") for _, m in problems)
    for name in conditions:
        if entries and not unknown and name not in used:
            problems.append((f"conditions.{name}", "no contrast uses this condition: every condition runs, so "
                                                   "use it in a contrast or remove it"))
    specs = raw.get("specificity")
    for i, t in enumerate(specs if isinstance(specs, list) else []):
        if not isinstance(t, dict):
            continue
        for key in ("effect", "control"):
            value = t.get(key)
            if isinstance(value, str) and value not in names:
                known = ", ".join(names) if names else "none named"
                problems.append((f"specificity[{i}].{key}", f"unknown contrast '{value}' (contrasts: {known})"))
        if isinstance(t.get("effect"), str) and t.get("effect") == t.get("control"):
            problems.append((f"specificity[{i}].control", "must differ from effect"))
        if isinstance(t.get("name"), str) and t["name"] in names:
            problems.append((f"specificity[{i}].name", f"'{t['name']}' is already a contrast's name"))
    if isinstance(specs, list) and has_one:
        for i, t in enumerate(specs):
            problems.append((f"specificity[{i}]", "a specificity test compares two named contrasts: use [[contrasts]]"))
    return problems


def _semantic_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the cross-field problems pydantic cannot see, reading the raw tables defensively."""
    problems = _condition_problems(raw) + _contrast_problems(raw)
    axis = _table(raw, "axis")
    fillers = axis.get("fillers") if isinstance(axis.get("fillers"), list) else []
    seen: dict[str, int] = {}
    for i, filler in enumerate(fillers):
        value = filler.get("value") if isinstance(filler, dict) else None
        if isinstance(value, str):
            if value in seen:
                problems.append((f"axis.fillers[{i}].value", f"'{value}' repeats axis.fillers[{seen[value]}]"))
            seen.setdefault(value, i)
    reference = _table(raw, "reference")
    given = [k for k in ("prompt", "image", "scenes") if reference.get(k) is not None]
    if reference and len(given) != 1:
        problems.append(("reference", "give exactly one of 'prompt' (generate the image), 'image' (a file) or "
                                      "'scenes' (several)"))
    scenes = reference.get("scenes") if isinstance(reference.get("scenes"), list) else []
    names: dict[str, int] = {}
    for k, scene in enumerate(scenes):
        if not isinstance(scene, dict):
            continue
        if (scene.get("prompt") is None) == (scene.get("image") is None):
            problems.append((f"reference.scenes[{k}]", "give exactly one of 'prompt' or 'image'"))
        name = scene.get("name", f"scene{k}")
        if name in names:
            problems.append((f"reference.scenes[{k}].name", f"'{name}' repeats reference.scenes[{names[name]}]"))
        names.setdefault(name, k)
    seeds = _table(raw, "probe").get("seed")
    if isinstance(seeds, list) and len(set(map(str, seeds))) < len(seeds):
        problems.append(("probe.seed", "repeats a seed (each seed is a level of the seed factor)"))
    return problems


_TYPE_WORDS = {"model_type": "should be a table", "dict_type": "should be a table", "model_attributes_type":
               "should be a table", "list_type": "should be an array", "int_type": "should be an integer",
               "string_type": "should be a string", "float_type": "should be a number", "bool_type":
               "should be true or false", "literal_error": None}


def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union it tried: 'str', 'list[str]', 'int', "literal['auto']", ...
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part.startswith(("literal", "constrained", "function-")))


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Return pydantic's errors as ``(dotted path, message)``, one per path, in plain TOML words."""
    by_path: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        message = err["msg"]
        if err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        elif _TYPE_WORDS.get(err["type"]):
            message = _TYPE_WORDS[err["type"]]
        message = re.sub(r"^Input should", "should", message).replace("Value error, ", "")
        message = re.sub(r" or instance of \w+", "", message)
        by_path.setdefault(_loc(loc), [])
        if message not in by_path[_loc(loc)]:
            by_path[_loc(loc)].append(message)
    out = []
    for path, msgs in by_path.items():
        text = msgs[0] + "".join(" or " + re.sub(r"^should be ", "", m) for m in msgs[1:3])
        out.append((path, text))
    return out
