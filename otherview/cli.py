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

_LEAVE_FAST = False  # set by ``run`` (the console script and ``python -m otherview``), never by tests


def process_seconds() -> float:
    """Return the seconds since this process started (from /proc where there is one, else since import)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def run() -> None:
    """Console entry point: run the command line, then leave at once once the results are written.

    Once ``exec`` has written its report there is nothing left to save; the interpreter's normal
    teardown (freeing tens of GiB of tensors one by one, destroying the CUDA context, joining
    atexit pools) took 12-16 s on an H100. Streams are flushed and inductor's compile workers
    stopped, then the process exits with ``os._exit``. A bug's traceback still prints as usual.
    """
    global _LEAVE_FAST
    _LEAVE_FAST = True
    main(prog_name="otherview")


def _leave(code: int = 0) -> None:
    """Flush, stop helper processes, and exit now without interpreter teardown (see ``run``)."""
    if not _LEAVE_FAST:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    if "otherview.compiling" in sys.modules:
        sys.modules["otherview.compiling"].release()
    os._exit(code)


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _load(path: str):
    from .spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as exc:
        _fail(exc.format(), EXIT_SPEC)


def _plan(spec, model_override: str | None):
    from .model import ModelUnavailable, architecture
    from .plan import PlanError, build_plan

    source = model_override or spec.model.source
    try:
        return build_plan(spec, architecture(source))
    except PlanError as exc:
        _fail(f"error: {exc}", EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)


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
    spec, _ = _load(spec_path)
    click.echo(f"{spec_path}: ok ({len(spec.axis.fillers)} {spec.axis.name}, {len(spec.conditions)} conditions)")


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@MODEL_OPTION
def plan(spec_path: str, model_override: str | None) -> None:
    """Compile SPEC into its passes and print them, without loading weights."""
    from .plan import describe

    from .model import ModelUnavailable, resolve_device
    from .stats import choose_method

    spec, _ = _load(spec_path)
    plan_ = _plan(spec, model_override)
    click.echo(describe(plan_))
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

    spec, raw = _load(spec_path)
    spec = with_overrides(spec, {"runtime.compile": compile_, "probe.batch_size": batch_size,
                                 "runtime.attention_backend": attention_backend})
    _plan(spec, model_override)  # fail fast, before any weights are touched
    start = time.perf_counter() - process_seconds()  # the clock starts with the process, imports included

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    try:
        run_dir = execute(spec, raw, spec_path, model_override=model_override, out_dir=out_dir, progress=progress)
    except (PlanError, CaptureError, ModelSettingError) as exc:
        _fail(f"error: {exc}", EXIT_SPEC)
    except ModelUnavailable as exc:
        _fail(f"error: {exc}", EXIT_UNAVAILABLE)
    click.echo(str(run_dir))
    _leave(0)


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
