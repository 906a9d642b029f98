"""The JSON Schema as the contract (agreement with validate), --set, paths, and the new/sites/validate commands."""

import copy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from otherview.cli import main
from otherview.spec import SpecError, json_schema, load_spec, parse_set, validate_raw

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "tests" / "specs"
SMALL = SPECS / "pass" / "small.toml"
SHIPPED = sorted((ROOT / "specs").glob("*.toml")) + sorted((SPECS / "pass").glob("*.toml"))


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _raw(path: Path = SMALL) -> dict:
    return tomllib.loads(path.read_text())


def _validates(raw: dict) -> bool:
    """Return what `otherview validate` says of ``raw``: the spec's rules, then the design's."""
    from otherview.design import DesignError, build_design

    try:
        build_design(validate_raw(raw))
        return True
    except (SpecError, DesignError):
        return False


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


_DELETE = object()
_MULTI = {"experiment": {"name": "m"}, "reference": {"prompt": "a kitchen"},
          "axis": {"slot": "x", "fillers": [{"value": f"v{i}"} for i in range(6)]},
          "conditions": {"a": "A {x}", "b": "B {x}", "c": "C {x}"},
          "contrasts": [{"name": "ab", "weights": {"a": 1, "b": -1}}, {"name": "cb", "a": "c", "b": "b"}],
          "specificity": [{"name": "s", "effect": "ab", "control": "cb"}]}

# Each case is a rule a JSON Schema can express: the schema and validate must agree on it.
EXPRESSIBLE = {
    "small as shipped": _raw(),
    "several contrasts, specificity": _MULTI,
    "reference prompt and image": _set(_raw(), "reference.image", "kitchen.png"),
    "reference neither": _set(_raw(), "reference.prompt", _DELETE),
    "reference prompt and scenes": _set(_raw(), "reference.scenes", [{"prompt": "p"}]),
    "reference scenes only": _set(_set(_raw(), "reference.prompt", _DELETE), "reference.scenes",
                                  [{"prompt": "p"}, {"name": "file", "image": "k.png", "seed": 3}]),
    "scene prompt and image": _set(_set(_raw(), "reference.prompt", _DELETE), "reference.scenes",
                                   [{"prompt": "p", "image": "k.png"}]),
    "scene neither": _set(_set(_raw(), "reference.prompt", _DELETE), "reference.scenes", [{"name": "x"}]),
    "contrast and contrasts": _set(_raw(), "contrasts", [{"name": "c", "a": "viewpoint", "b": "mention"}]),
    "no contrast": _set(_raw(), "contrast", _DELETE),
    "contrast weights and a": _set(_raw(), "contrast", {"a": "viewpoint", "weights": {"viewpoint": 1, "mention": -1}}),
    "contrast weights only": _set(_raw(), "contrast", {"weights": {"viewpoint": 1, "mention": -1}}),
    "contrast a without b": _set(_raw(), "contrast", {"a": "viewpoint"}),
    "contrasts entry without name": _set(_MULTI, "contrasts", [{"weights": {"a": 1, "b": -1}},
                                                               {"name": "cb", "a": "c", "b": "b"}]),
    "weights with one condition": _set(_raw(), "contrast", {"weights": {"viewpoint": 1}}),
    "specificity with [contrast]": _set(_raw(), "specificity", [{"name": "s", "effect": "a", "control": "b"}]),
    "batch_size as a string": _set(_raw(), "probe.batch_size", "8"),
    "batch_size auto": _set(_raw(), "probe.batch_size", "auto"),
    "batch_size 0": _set(_raw(), "probe.batch_size", 0),
    "seed true": _set(_raw(), "probe.seed", True),
    "seed list": _set(_raw(), "probe.seed", [0, 1]),
    "seed list repeats": _set(_raw(), "probe.seed", [0, 0]),
    "wordings repeat": _set(_raw(), "conditions", {"viewpoint": ["V {animal}", "V {animal}"],
                                                   "mention": ["M {animal}", "N {animal}"]}),
    "condition name with a space": _set(_MULTI, "conditions", {"a": "A {x}", "b": "B {x}", "c d": "C {x}"}),
    "unknown placeholder in output.dir": _set(_raw(), "output.dir", "runs/{nmae}"),
    "lone brace in output.dir": _set(_raw(), "output.dir", "runs/{name"),
    "output.dir with {name}": _set(_raw(), "output.dir", "out/{name}/x"),
    "unit_width head": _set(_raw(), "capture.unit_width", "head"),
    "quantile 1": _set(_raw(), "null.quantile", 1.0),
    "threshold int": _set(_raw(), "null.thresholds", [2, 4]),
    "device cuda:1": _set(_raw(), "model.device", "cuda:1"),
    "device gpu": _set(_raw(), "model.device", "gpu"),
    "unknown key": _set(_raw(), "probe.stepz", 2),
    "missing axis": _set(_raw(), "axis", _DELETE),
    "experiment name with a space": _set(_raw(), "experiment.name", "a b"),
}

# Rules only validate checks (README: "Only validate checks"): the schema accepts, validate rejects.
VALIDATE_ONLY = {
    "template without the slot": _set(_raw(), "conditions", {"viewpoint": "V", "mention": "M {animal}"}),
    "unknown slot": _set(_raw(), "conditions", {"viewpoint": "V {animal} {x}", "mention": "M {animal}"}),
    "wording counts differ": _set(_raw(), "conditions", {"viewpoint": ["V {animal}", "W {animal}"],
                                                         "mention": "M {animal}"}),
    "unknown condition": _set(_raw(), "contrast", {"a": "viewpoint", "b": "nope"}),
    "weights not summing to 0": _set(_raw(), "contrast", {"weights": {"viewpoint": 1, "mention": -2}}),
    "a equals b": _set(_raw(), "contrast", {"a": "viewpoint", "b": "viewpoint"}),
    "unused condition": _set(_raw(), "conditions", {"viewpoint": "V {animal}", "mention": "M {animal}",
                                                    "extra": "E {animal}"}),
    # JSON has no integer/float distinction: 16.0 is an integer to a JSON Schema, a float to TOML
    "a whole float for an integer": _set(_raw(), "capture.unit_width", 16.0),
    "repeated filler": _set(_raw(), "axis.fillers", [{"value": "a cat"}, {"value": "a cat"}]),
    "specificity names an unknown contrast": _set(_MULTI, "specificity", [{"name": "s", "effect": "ab",
                                                                           "control": "zz"}]),
}


@pytest.mark.parametrize("name", list(EXPRESSIBLE))
def test_schema_and_validate_agree(validator, name):
    raw = EXPRESSIBLE[name]
    assert validator.is_valid(raw) == _validates(raw), (name, [e.message for e in validator.iter_errors(raw)])


@pytest.mark.parametrize("name", list(VALIDATE_ONLY))
def test_rules_only_validate_checks(validator, name):
    raw = VALIDATE_ONLY[name]
    assert validator.is_valid(raw) and not _validates(raw), name


@pytest.mark.parametrize("path", SHIPPED + sorted((SPECS / "fail").glob("0*.toml")), ids=lambda p: p.name)
def test_schema_and_validate_agree_on_the_fixtures(validator, path):
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        pytest.skip("not TOML")
    # validate-only rules (README: "Only validate checks"): slots, unused conditions, template forms,
    # contrast arithmetic, and the design checks (identical renderings, the null's resolution)
    expressible = path.stem not in ("005_wrong_slot", "006_duplicate_filler", "009_unused_condition",
                                    "010_template_format", "011_identical_conditions", "012_one_item",
                                    "013_contrast_rules", "015_too_few_flips")
    if expressible:
        assert validator.is_valid(raw) == _validates(raw)
    else:
        assert validator.is_valid(raw) and not _validates(raw)


def test_schema_has_dialect_and_a_description_everywhere():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    # every property of the spec and of every table (the rule fragments under allOf/oneOf are no properties)
    tables = {"": schema} | schema["$defs"]
    missing = [f"{t}.{name}" for t, node in tables.items() for name, prop in node.get("properties", {}).items()
               if not prop.get("description")]
    assert not missing, missing
    assert all(d.get("description") for d in schema["$defs"].values())


def test_parse_set_reads_toml_literals():
    assert parse_set("probe.batch_size=8") == (["probe", "batch_size"], 8)
    assert parse_set('probe.batch_size="8"') == (["probe", "batch_size"], "8")
    assert parse_set("null.thresholds=[2.0, 4]") == (["null", "thresholds"], [2.0, 4])
    assert parse_set("model.source=builtin:tiny") == (["model", "source"], "builtin:tiny")
    assert parse_set('axis.fillers[1].value="a b"') == (["axis", "fillers", 1, "value"], "a b")
    with pytest.raises(ValueError):
        parse_set("no equals sign")


def test_paths_resolve_against_the_spec_folder(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    text = SMALL.read_text().replace('prompt = "A photographic', 'image = "img/kitchen.png"\n# prompt = "A')
    (folder / "s.toml").write_text(text + '\n[output]\ndir = "../runs/{name}"\n')
    monkeypatch.chdir(tmp_path / "specs")
    a, _ = load_spec("s.toml")
    monkeypatch.chdir(ROOT)
    b, _ = load_spec(folder / "s.toml")
    assert a.output.dir == b.output.dir == str(tmp_path / "runs" / "{name}")
    assert a.reference.image == b.reference.image == str(folder / "img" / "kitchen.png")


def test_set_through_validate_and_plan(runner):
    ok = runner.invoke(main, ["validate", str(SMALL), "--set", "probe.batch_size=3", "--set", "null.flips=123"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(main, ["validate", str(SMALL), "--set", 'probe.batch_size="3"', "--set",
                               'output.dir="x/{nmae}"', "--set", "nonsense"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [f"{SMALL}: --set nonsense: should be dotted.path=value (e.g. "
                                               'probe.batch_size=8 or axis.fillers[0].value="a cat")']
    bad = runner.invoke(main, ["validate", str(SMALL), "--set", 'probe.batch_size="3"', "--set",
                               'output.dir="x/{nmae}"'])
    assert bad.output.strip().splitlines() == [f"{SMALL}: probe.batch_size: should be 'auto' or an integer",
                                               f"{SMALL}: output.dir: unknown placeholder {{nmae}} (known: {{name}})"]
    plan = runner.invoke(main, ["plan", str(SMALL), "--set", "probe.batch_size=3", "--set", "null.flips=777"])
    assert plan.exit_code == 0, plan.output
    assert "batch 3" in plan.output and "random = 777 flips" in plan.output


def test_exec_passes_set_to_the_run_and_its_manifest(runner, monkeypatch, tmp_path):
    from otherview import interpreter

    seen = {}

    def fake_execute(spec, raw, spec_path, **kwargs):
        seen.update(spec=spec, **kwargs)
        return tmp_path

    monkeypatch.setattr(interpreter, "execute", fake_execute)
    result = runner.invoke(main, ["exec", str(SMALL), "--set", "null.flips=999", "--set", "probe.seed=[1, 2]", "-q"])
    assert result.exit_code == 0, result.output
    assert seen["overrides"] == ["null.flips=999", "probe.seed=[1, 2]"]
    assert seen["spec"].null.flips == 999 and seen["spec"].probe.seed == [1, 2]


def test_validate_and_plan_import_neither_diffusers_nor_dynamo():
    """The default attention and compile backends are checked without importing them (seconds each)."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom otherview.cli import main\n"
            f"for args in (['validate', {str(SMALL)!r}], ['plan', {str(SMALL)!r}]):\n"
            "    result = CliRunner().invoke(main, args)\n    assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('diffusers', 'torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_validate_takes_several_files_and_reports_each(runner):
    fail = SPECS / "fail" / "001_unknown_key.toml"
    result = runner.invoke(main, ["validate", str(SMALL), str(fail), str(SPECS / "pass" / "minimal.toml")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"{SMALL}: ok") and lines[-1].startswith(f"{SPECS / 'pass' / 'minimal.toml'}: ok")
    assert f"{fail}: null.flipz: unknown key" in lines


def test_new_writes_a_spec_that_validates(runner, tmp_path):
    made = runner.invoke(main, ["new", "myprobe", "--dir", str(tmp_path)])
    assert made.exit_code == 0, made.output
    path = tmp_path / "myprobe.toml"
    assert made.output.strip() == str(path) and path.read_text().count("#") > 20
    checked = runner.invoke(main, ["validate", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "3 contrast(s), 1 specificity test(s)" in checked.output
    assert runner.invoke(main, ["new", "myprobe", "--dir", str(tmp_path)]).exit_code == 2  # never overwrites
    assert runner.invoke(main, ["new", "my probe", "--dir", str(tmp_path)]).exit_code == 2


def test_sites_lists_roles_streams_tokens_and_units(runner):
    result = runner.invoke(main, ["sites", "--model", "builtin:klein-4b"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "attention-out text  (double-stream, text stream" in out and "transformer_blocks.*.attn.to_add_out" in out
    assert "tokens seen: 512 (text 512)" in out
    assert "tokens seen: 8,192 (target 4096 + reference 4096)" in out
    assert "units: 15,360 (3,840 attention, 11,520 MLP)" in out
    assert "all sites: 17,280 units" in out and ": 16,320" in out
    heads = runner.invoke(main, ["sites", "--model", "builtin:tiny", "--unit-width", "head"])
    assert heads.exit_code == 0 and "units: 8 (2 attention, 6 MLP)" in heads.output
    assert runner.invoke(main, ["sites", "--model", "builtin:tiny", "--unit-width", "5"]).exit_code == 2
