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


def _load(path: str, design: bool = True):
    """Return (spec, raw text, design) of the spec at ``path``; exit 2 naming every problem."""
    from .design import DesignError, build_design
    from .spec import SpecError, load_spec

    try:
        spec, raw = load_spec(path)
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
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
def validate(spec_path: str) -> None:
    """Check SPEC and report every problem (exit 2 if any)."""
    spec, _, design = _load(spec_path)
    click.echo(f"{spec_path}: ok ({len(spec.axis.fillers)} {spec.axis.name}, {len(spec.conditions)} conditions, "
               f"{len(design.contrasts)} contrast(s), {len(design.specificity)} specificity test(s), "
               f"{len(design.passes)} probe passes)")


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@MODEL_OPTION
@click.option("--prompts", is_flag=True, help="Also print every rendered prompt, one line per pass.")
def plan(spec_path: str, model_override: str | None, prompts: bool) -> None:
    """Compile SPEC into its passes and print them, without loading weights."""
    from .plan import describe

    from .model import ModelUnavailable, resolve_device
    from .stats import choose_method

    spec, _, design = _load(spec_path)
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
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def exec_(spec_path: str, model_override: str | None, out_dir: str | None, compile_: str | None,
          batch_size: int | None, attention_backend: str | None, quiet: bool) -> None:
    """Run SPEC end to end and write its run directory and report."""
    from .capture import CaptureError
    from .interpreter import execute
    from .model import ModelSettingError, ModelUnavailable
    from .plan import PlanError
    from .spec import with_overrides

    spec, raw, design = _load(spec_path)
    spec = with_overrides(spec, {"runtime.compile": compile_, "probe.batch_size": batch_size,
                                 "runtime.attention_backend": attention_backend})
    _plan(spec, model_override, spec_path, design)  # fail fast, before any weights are touched
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    try:
        run_dir = execute(spec, raw, spec_path, model_override=model_override, out_dir=out_dir, progress=progress)
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


def _unit_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter("a comma-separated list of unit indices, e.g. 3,17,250") from None


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--contrast", metavar="NAME", help="The analysis whose top --top units by |t| are tested (a contrast, or "
              "<contrast>.step<k>); with --units or --specificity, the contrast whose two conditions are used.")
@click.option("--top", type=click.IntRange(min=1), help="How many units (default 10).")
@click.option("--units", callback=_unit_list, help="Test these units instead (indices, comma-separated).")
@click.option("--specificity", metavar="NAME", help="Test the --top units passing this specificity test.")
@click.option("--intervention", type=click.Choice(["zero", "mean", "patch"]), default="patch", show_default=True,
              help="Zero the units' channels, set them to their mean over the two conditions' passes, or patch in "
                   "the other condition's values for the same item, scene, seed and wording.")
@click.option("--random-sets", type=click.IntRange(min=1), default=100, show_default=True,
              help="Random unit sets matched per site and kind.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random sets.")
@click.option("--images", type=click.IntRange(min=0), default=0, show_default=True,
              help="Decode A, A under the intervention, and B for this many items (a figure).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Passes per batch (default: the run's).")
@MODEL_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def causal(run_dir: str, contrast: str | None, top: int | None, units: list[int] | None, specificity: str | None,
           intervention: str, random_sets: int, seed: int, images: int, batch_size: int | None,
           model_override: str | None, quiet: bool) -> None:
    """Intervene on a finished run's units against matched random unit sets; add a Causal test to its report."""
    from .causal import CausalError, Request, run_causal
    from .causal_report import update_report
    from .model import ModelUnavailable
    from .plan import PlanError

    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    req = Request(contrast=contrast, top=top, units=units, specificity=specificity, intervention=intervention,
                  random_sets=random_sets, seed=seed, images=images, model=model_override, batch_size=batch_size)
    try:
        record = run_causal(run_dir, req, progress)
    except (CausalError, PlanError) as exc:
        _fail(_problems(run_dir, exc.problems), EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)
    update_report(run_dir)  # `otherview report RUN_DIR` redraws everything, this section included
    r = record["result"]
    click.echo(f"{run_dir}: {record['selection']['count']} units, {intervention}: toward {r['selected_mean_toward']:.3g} "
               f"(random median {r['random_median_toward']:.3g}), permutation p {r['p_permutation']:.3g}")
