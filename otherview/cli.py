"""The command line: parses arguments, calls one function per command, turns known errors into exit codes.

Exit codes: 0 success, 1 a bug (traceback shown), 2 a problem with the spec or its fit to the model,
3 the model or device is not available here.
"""

from __future__ import annotations

import json
import logging
import os
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
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@MODEL_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Parent of the run directory (default: the spec's output.dir).")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), help="Override runtime.compile.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override probe.batch_size.")
@click.option("--attention-backend", help="Override runtime.attention_backend (a diffusers backend name).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Share the probe batches among N processes on this machine (starts `accelerate launch`).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def exec_(spec_paths: tuple[str, ...], model_override: str | None, out_dir: str | None, compile_: str | None,
          batch_size: int | None, attention_backend: str | None, processes: int, quiet: bool) -> None:
    """Run each SPEC end to end and write its run directory and report.

    Several specs share the loaded model (one run directory each). Under `accelerate launch`
    (or with --processes N) the probe batches are shared among the processes.
    """
    from .capture import CaptureError
    from .interpreter import execute
    from .model import ModelSettingError, ModelUnavailable
    from .plan import PlanError
    from .spec import with_overrides

    specs = []
    for spec_path in spec_paths:  # every spec checked before any weights are touched
        spec, raw, design = _load(spec_path)
        spec = with_overrides(spec, {"runtime.compile": compile_, "probe.batch_size": batch_size,
                                     "runtime.attention_backend": attention_backend})
        _plan(spec, model_override, spec_path, design)
        specs.append((spec_path, spec, raw))
    if processes > 1:
        sys.exit(_launch(processes, sys.argv[sys.argv.index("exec") + 1:] if "exec" in sys.argv else []))
    start = time.perf_counter()
    main_process = int(os.environ.get("RANK", "0")) == 0

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    models: dict = {}
    for spec_path, spec, raw in specs:
        try:
            run_dir = execute(spec, raw, spec_path, model_override=model_override, out_dir=out_dir, progress=progress,
                              models=models)
        except PlanError as exc:
            _fail(_problems(spec_path, exc.problems), EXIT_SPEC)
        except (CaptureError, ModelSettingError) as exc:
            _fail(f"{spec_path}: {exc}", EXIT_SPEC)
        except ModelUnavailable as exc:
            _fail(f"error: {exc}", EXIT_UNAVAILABLE)
        if main_process:
            click.echo(str(run_dir))


def _launch(processes: int, args: list[str]) -> int:
    """Run ``otherview exec ARGS`` (without --processes) in ``processes`` processes through accelerate."""
    import socket
    import subprocess

    rest, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        rest.append(a)
    with socket.socket() as sock:  # a free port on this machine for the processes to meet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend",
           "no", "-m", "otherview", "exec", *rest]
    return subprocess.call(cmd)


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
