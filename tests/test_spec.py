"""The spec language through the real CLI: fixtures that pass, and failures with their exact messages."""

import json
from pathlib import Path

import pytest

from otherview.cli import main
from otherview.spec import SpecError, load_spec, parse_spec, spec_hash

SPECS = Path(__file__).resolve().parent / "specs"
ROOT = Path(__file__).resolve().parents[1]
PASS = sorted((SPECS / "pass").glob("*.toml")) + sorted((ROOT / "specs").glob("*.toml"))
FAIL = sorted((SPECS / "fail").glob("*.toml"))


@pytest.mark.parametrize("path", PASS, ids=lambda p: p.name)
def test_valid_specs_validate(runner, path):
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert ": ok" in result.output


@pytest.mark.parametrize("path", FAIL, ids=lambda p: p.stem)
def test_invalid_specs_name_every_problem(runner, path):
    expected = path.with_suffix(".expected").read_text().replace("{path}", str(path)).strip()
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == expected
    assert "Traceback" not in result.output and "pydantic" not in result.output


def test_several_mistakes_are_all_reported(runner):
    path = SPECS / "fail" / "002_several_mistakes.toml"
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 5


def test_missing_file_is_a_user_error(runner, tmp_path):
    result = runner.invoke(main, ["validate", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_plantain_reproduces_the_card():
    spec, _ = load_spec(ROOT / "specs" / "plantain.toml")
    assert spec.model.source == "black-forest-labs/FLUX.2-klein-base-4B"
    assert (spec.reference.steps, spec.reference.guidance_scale) == (14, 4.0)
    assert (spec.probe.steps, spec.probe.guidance_scale) == (1, 1.0)
    fillers = spec.axis.fillers
    assert len(fillers) == 30
    card = [f.value for f in fillers if f.source == "card"]
    assert len(card) == 19 and sum(f.source == "ours" for f in fillers) == 11
    assert card[0] == "an adult human" and card[-1] == "an alien with non-visual senses"
    assert spec.prompt("viewpoint", fillers[9]) == "Render this kitchen from the viewpoint of a cat"
    assert spec.prompt("mention", fillers[9]) == "Render this kitchen with a cat in it"
    assert spec.null.flips == 200 and spec.null.thresholds == [3.0, 5.0] and spec.null.quantile == 0.99
    assert spec.capture.unit_width == 16
    assert spec.ranks() == sorted(spec.ranks())


def test_hash_is_stable_and_sensitive():
    text = (SPECS / "pass" / "minimal.toml").read_text()
    a, b = parse_spec(text), parse_spec(text)
    assert spec_hash(a) == spec_hash(b)
    c = parse_spec(text.replace('name = "minimal"', 'name = "other"'))
    assert spec_hash(c) != spec_hash(a)


def test_spec_error_collects_problems():
    with pytest.raises(SpecError) as info:
        parse_spec("[experiment]\nname = 'x y'\n", "s.toml")
    lines = info.value.format().splitlines()
    assert lines[0].startswith("s.toml: experiment.name: String should match pattern")
    assert any(line == "s.toml: reference: required key is missing" for line in lines)


def test_schema_is_json_schema(runner):
    result = runner.invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["type"] == "object" and "experiment" in schema["properties"]
    assert schema["additionalProperties"] is False
