"""The command line: parses arguments, calls one function per command, turns known errors into exit codes.

Exit codes: 0 success, 1 a bug (traceback shown), 2 a problem with the spec or its fit to the model,
3 the model or device is not available here.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import click

from . import __version__

EXIT_SPEC = 2
EXIT_UNAVAILABLE = 3


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _problems(source: str, problems) -> str:
    return "\n".join(f"{source}: {p}: {m}" if p else f"{source}: {m}" for p, m in problems)


def _load(path: str, design: bool = True, sets: tuple[str, ...] = ()):
    """Return (spec, raw text, design) of the spec at ``path`` (``--set`` applied); exit 2 naming every problem."""
    from .design import DesignError, build_design
    from .spec import SpecError, load_spec

    try:
        spec, raw = load_spec(path, sets)
    except SpecError as exc:
        _fail(exc.format(), EXIT_SPEC)
    if not design:
        return spec, raw, None
    try:
        return spec, raw, build_design(spec)
    except DesignError as exc:
        _fail(_problems(path, exc.problems), EXIT_SPEC)


def _plan(spec, model_override: str | None, path: str, design=None):
    from .design import DesignError
    from .model import ModelUnavailable, architecture
    from .plan import PlanError, build_plan

    source = model_override or spec.model.source
    try:
        return build_plan(spec, architecture(source), design)
    except (PlanError, DesignError) as exc:
        _fail(_problems(path, exc.problems), EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"{path}: model.source: {exc}", EXIT_UNAVAILABLE)


SET_OPTION = click.option("--set", "sets", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value before validation (repeatable): probe.batch_size=8, "
                               "'null.thresholds=[2.0, 4.0]', model.source=builtin:tiny. Values are TOML literals "
                               "(text that is none is a string); exec records them in the manifest (overrides).")

MODEL_OPTION = click.option("--model", "model_override", metavar="SOURCE",
                            help="Override the spec's model: a hub id, a local folder, builtin:tiny or builtin:klein-4b.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="otherview")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug, e.g. each hook attached).")
def main(verbose: int) -> None:
    """otherview: ask a diffusion transformer a question at the level of its attention heads.

    A spec (TOML) describes a paired-prompt probe; `otherview exec SPEC` runs it and writes a report.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@SET_OPTION
def validate(spec_paths: tuple[str, ...], sets: tuple[str, ...]) -> None:
    """Check each SPEC and report every problem of every file (exit 2 if any)."""
    failed = 0
    for spec_path in spec_paths:
        try:
            _validate_one(spec_path, sets)
        except SystemExit as exc:  # _load printed the problems; go on with the next file
            if exc.code != EXIT_SPEC or len(spec_paths) == 1:
                raise
            failed += 1
    if failed:
        sys.exit(EXIT_SPEC)


def _validate_one(spec_path: str, sets: tuple[str, ...]) -> None:
    spec, _, design = _load(spec_path, sets=sets)
    click.echo(f"{spec_path}: ok ({len(spec.axis.fillers)} {spec.axis.name}, {len(spec.conditions)} conditions, "
               f"{len(design.contrasts)} contrast(s), {len(design.specificity)} specificity test(s), "
               f"{len(design.passes)} probe passes)")


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@MODEL_OPTION
@SET_OPTION
@click.option("--prompts", is_flag=True, help="Also print every rendered prompt, one line per pass.")
def plan(spec_path: str, model_override: str | None, sets: tuple[str, ...], prompts: bool) -> None:
    """Compile SPEC into its passes and print them, without loading weights."""
    from .plan import describe

    from .model import ModelUnavailable, resolve_device
    from .stats import choose_method

    spec, _, design = _load(spec_path, sets=sets)
    plan_ = _plan(spec, model_override, spec_path, design)
    click.echo(describe(plan_, prompts=prompts))
    try:
        device = resolve_device(spec.model.device)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)
    method = choose_method(spec.null.method, len(spec.axis.fillers), plan_.n_units, device)
    click.echo(f"null method on this machine ({device}): {method}")


@main.command(name="exec")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@MODEL_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Parent of the run directory (default: the spec's output.dir).")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), help="Override runtime.compile.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override probe.batch_size.")
@click.option("--attention-backend", help="Override runtime.attention_backend (a diffusers backend name).")
@SET_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def exec_(spec_path: str, model_override: str | None, out_dir: str | None, compile_: str | None,
          batch_size: int | None, attention_backend: str | None, sets: tuple[str, ...], quiet: bool) -> None:
    """Run SPEC end to end and write its run directory and report."""
    from .capture import CaptureError
    from .interpreter import execute
    from .model import ModelSettingError, ModelUnavailable
    from .plan import PlanError
    from .spec import with_overrides

    spec, raw, design = _load(spec_path, sets=sets)
    spec = with_overrides(spec, {"runtime.compile": compile_, "probe.batch_size": batch_size,
                                 "runtime.attention_backend": attention_backend})
    _plan(spec, model_override, spec_path, design)  # fail fast, before any weights are touched
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    try:
        run_dir = execute(spec, raw, spec_path, model_override=model_override, out_dir=out_dir, progress=progress,
                          overrides=list(sets))
    except PlanError as exc:
        _fail(_problems(spec_path, exc.problems), EXIT_SPEC)
    except (CaptureError, ModelSettingError) as exc:
        _fail(f"{spec_path}: {exc}", EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)
    click.echo(str(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def report(run_dir: str) -> None:
    """Re-render RUN_DIR's report from its files, without the model."""
    from .report import write_report

    try:
        click.echo(str(write_report(run_dir)))
    except FileNotFoundError as exc:
        _fail(f"error: {exc}", EXIT_SPEC)


@main.command()
def schema() -> None:
    """Print the JSON Schema of a spec (for editors)."""
    from .spec import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("name")
@click.option("--dir", "folder", default=".", type=click.Path(file_okay=False), help="Folder to write NAME.toml in.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def new(name: str, folder: str, force: bool) -> None:
    """Write NAME.toml: a commented spec (effect, control and specificity) that validates as written."""
    from .scaffold import write_new

    try:
        click.echo(str(write_new(name, folder, force)))
    except (ValueError, FileExistsError) as exc:
        _fail(f"error: {exc}", EXIT_SPEC)


@main.command()
@click.option("--model", "source", default="black-forest-labs/FLUX.2-klein-base-4B", show_default=True,
              metavar="SOURCE", help="A hub id, a local folder, builtin:tiny, builtin:klein-4b or builtin:klein-9b.")
@click.option("--unit-width", default="16", show_default=True, help="Channels per unit, or 'head'.")
@click.option("--size", type=click.IntRange(min=1), help="Image side in pixels (default: 1024, or the built-in's own).")
@click.option("--text-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="model.max_sequence_length.")
def sites(source: str, unit_width: str, size: int | None, text_tokens: int) -> None:
    """List what MODEL can capture: projections by role, their streams, token counts and units (no weights)."""
    from .architectures import ArchitectureError
    from .model import ModelUnavailable, architecture
    from .sites import describe_sites

    width = unit_width if unit_width == "head" else int(unit_width) if unit_width.isdigit() and int(unit_width) > 0 else None
    if width is None:
        _fail(f"error: --unit-width should be a positive integer or 'head', got '{unit_width}'", EXIT_SPEC)
    try:
        click.echo(describe_sites(architecture(source), width, text_tokens, size))
    except ArchitectureError as exc:
        _fail(f"error: {exc}", EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)
