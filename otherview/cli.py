"""The command line: parses arguments, calls one function per command, turns known errors into exit codes.

This is the one place errors become exit codes (the table is in ``otherview.errors``): 0 success,
1 a bug (traceback shown), 2 a problem with the spec, its inputs or a run directory, 3 the model or
device is not available or usable here (NaN or inf from the model included), 130/143 interrupted
by SIGINT/SIGTERM. Every message names the file and, where there is one, the dotted spec path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import click

from . import __version__, errors, startup

EXIT_SPEC = errors.EXIT_USER
EXIT_UNAVAILABLE = errors.EXIT_UNAVAILABLE

_LEAVE_FAST = False  # set by ``run`` (the console script and ``python -m otherview``), never by tests


def run() -> None:
    """Console entry point: run the command line, then leave at once once the results are written.

    Once ``exec`` has written its report there is nothing left to save; the interpreter's normal
    teardown (freeing tens of GiB of tensors one by one, destroying the CUDA context, joining
    atexit pools) took 12-16 s on an H100. Streams are flushed and inductor's compile workers
    stopped, then the process exits with ``os._exit``. A bug's traceback still prints as usual.
    Before anything imports torch, ``startup.prepare`` gives an install without bytecode
    otherview's bytecode cache and scans the installed distributions once.
    """
    global _LEAVE_FAST
    _LEAVE_FAST = True
    startup.prepare()
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


def _problems(source: str, problems) -> str:
    return "\n".join(f"{source}: {p}: {m}" if p else f"{source}: {m}" for p, m in problems)


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _handled(source_param: str):
    """Run a command, turning each known error into its message (naming the file) and exit code."""
    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except (Exception, errors.Interrupted, KeyboardInterrupt) as exc:
                if isinstance(exc, KeyboardInterrupt):
                    exc = errors.Interrupted(2)
                code = errors.exit_code(exc)
                if code is None:
                    raise  # a bug: its traceback is what helps
                source = kwargs.get(source_param) or kwargs.get("resume_dir")
                if isinstance(source, (tuple, list)):  # several specs: the one being run, else the first
                    source = getattr(exc, "spec_path", None) or (source[0] if source else None)
                text = errors.message(exc, source)
                run_dir = getattr(exc, "run_dir", None)
                if run_dir is not None:
                    text += _run_dir_note(exc, run_dir)
                _fail(text, code)
        return run
    return wrap


def _run_dir_note(exc: BaseException, run_dir) -> str:
    if isinstance(exc, errors.Interrupted):
        return (f"\nrun directory {run_dir}: status interrupted; `otherview exec --resume {run_dir}` continues it "
                "from its last finished probe batch")
    return f"\nrun directory {run_dir}: status failed, with this reason in manifest.json"


def _load(path: str, sets: tuple[str, ...] = ()):
    """Return (spec, raw text) of the spec at ``path`` (``--set`` applied); ``SpecError`` names every problem."""
    from .spec import load_spec

    return load_spec(path, sets)


SET_OPTION = click.option("--set", "sets", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value before validation (repeatable): probe.batch_size=8, "
                               "'null.thresholds=[2.0, 4.0]', model.source=builtin:tiny. Values are TOML literals "
                               "(text that is none is a string); exec records them in the manifest (overrides).")

def _memory_setting(ctx, param, value):
    """Check ``--memory`` as the spec's ``runtime.memory`` is checked."""
    if value is None:
        return None
    from .memory import parse_size  # imports torch: only for a value to check

    try:
        parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


MEMORY_OPTION = click.option("--memory", callback=_memory_setting, metavar="SIZE",
                             help="Override runtime.memory: the GPU memory the run may use ('auto', '20GiB', '16GB', "
                                  "a number of GiB).")

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
    """Check each SPEC and everything checkable before weights; report every problem of every file.

    Exit 2 if any file has a problem (3 for a device that is not here).
    """
    codes = []
    for spec_path in spec_paths:
        try:
            _validate_one(spec_path=spec_path, sets=sets)
        except SystemExit as exc:  # the problems are printed; go on with the next file
            codes.append(exc.code)
    if codes:
        sys.exit(max(c for c in codes if isinstance(c, int)) if any(isinstance(c, int) for c in codes) else 2)


@_handled("spec_path")
def _validate_one(spec_path: str, sets: tuple[str, ...]) -> None:
    from .checks import preflight

    spec, _ = _load(spec_path, sets)
    spec, plan_ = preflight(spec, spec_path)
    design = plan_.design
    click.echo(f"{spec_path}: ok ({len(spec.axis.fillers)} {spec.axis.name}, {len(spec.conditions)} conditions, "
               f"{len(design.contrasts)} contrast(s), {len(design.specificity)} specificity test(s), "
               f"{len(design.passes)} probe passes)")


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@MODEL_OPTION
@SET_OPTION
@MEMORY_OPTION
@click.option("--prompts", is_flag=True, help="Also print every rendered prompt, one line per pass.")
@_handled("spec_path")
def plan(spec_path: str, model_override: str | None, sets: tuple[str, ...], memory: str | None, prompts: bool) -> None:
    """Compile SPEC into its passes and print them, without loading weights."""
    from .checks import preflight, resolved_device
    from .memory import describe as describe_memory, plan_memory
    from .plan import describe
    from .spec import with_overrides
    from .stats import choose_method

    spec, _ = _load(spec_path, sets)
    spec = with_overrides(spec, {"runtime.memory": memory})
    spec, plan_ = preflight(spec, spec_path, model_override)
    click.echo(describe(plan_, prompts=prompts))
    layers = ", ".join(map(str, plan_.arch.text_encoder_out_layers))
    click.echo(f"text encoder states stacked: {layers}"
               + (" (model.text_encoder_out_layers)" if spec.model.text_encoder_out_layers else " (the model's)"))
    device = resolved_device(spec)
    method = choose_method(spec.null.method, plan_.flips["pairs"], plan_.n_units, device)
    click.echo(f"null method on this machine ({device}): {method}")
    click.echo("\n".join(describe_memory(plan_memory(plan_, device))))  # MemoryBudgetError: exit 3


@main.command(name="exec")
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, type=click.Path(dir_okay=False))
@MODEL_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Parent of the run directory (default: the spec's output.dir).")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), help="Override runtime.compile.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override probe.batch_size.")
@click.option("--attention-backend", help="Override runtime.attention_backend (a diffusers backend name).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Share the probe batches and the sign-flip nulls' flips among N processes on this machine "
                   "(starts `accelerate launch`).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the interrupted or failed run in this run directory (SPEC, if given, must be its spec); "
                   "with --processes N, the missing probe batches are shared among N processes.")
@SET_OPTION
@MEMORY_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@_handled("spec_paths")
def exec_(spec_paths: tuple[str, ...], model_override: str | None, out_dir: str | None, compile_: str | None,
          batch_size: int | None, attention_backend: str | None, processes: int, resume_dir: str | None,
          sets: tuple[str, ...], memory: str | None, quiet: bool) -> None:
    """Run each SPEC end to end and write its run directory and report (or continue one with --resume).

    Several specs share the loaded model (one run directory each). Under `accelerate launch` (or with
    --processes N) the probe batches and each sign-flip null's flips are shared among the processes.
    """
    from .checks import preflight
    from .interpreter import execute, resume
    from .spec import with_overrides
    from .store import process_seconds

    start = time.perf_counter() - process_seconds()  # the clock starts with the process, imports included
    main_process = int(os.environ.get("RANK", "0")) == 0

    def progress(msg: str) -> None:
        if not quiet and main_process:
            click.echo(f"[{time.perf_counter() - start:7.1f}s] {msg}", err=True)

    if resume_dir is not None:
        changed = [name for name, v in (("--model", model_override), ("--out", out_dir), ("--compile", compile_),
                                        ("--batch-size", batch_size), ("--attention-backend", attention_backend),
                                        ("--set", sets), ("--memory", memory)) if v]
        if changed:
            raise errors.UserError(f"{', '.join(changed)}: a resumed run keeps the settings it was started with",
                                   source=resume_dir)
        if len(spec_paths) > 1:
            raise errors.UserError("--resume continues one run: give at most its one SPEC", source=resume_dir)
        raw = _load(spec_paths[0])[1] if spec_paths else None
        if processes > 1:  # the batches not recorded yet, shared among N processes
            sys.exit(_launch(processes, [*spec_paths, "--resume", resume_dir, *(["-q"] if quiet else [])]))
        run_dir = resume(resume_dir, raw, progress=progress)
        if main_process:
            click.echo(str(run_dir))
        _leave(0)
        return
    if not spec_paths:
        raise click.UsageError("give SPEC, or --resume RUN_DIR")
    specs = []
    for spec_path in spec_paths:  # every spec checked before any weights are touched
        spec, raw = _load(spec_path, sets)
        spec = with_overrides(spec, {"runtime.compile": compile_, "probe.batch_size": batch_size,
                                     "runtime.attention_backend": attention_backend, "runtime.memory": memory})
        try:
            _, plan_ = preflight(spec, spec_path, model_override, out_dir)
        except Exception as exc:
            exc.spec_path = spec_path  # the file its message names
            raise
        specs.append((spec_path, spec, raw, plan_))
    if processes > 1:
        sys.exit(_launch(processes, sys.argv[sys.argv.index("exec") + 1:] if "exec" in sys.argv else []))
    models: dict = {}
    for spec_path, spec, raw, plan_ in specs:
        try:  # each spec's plan is the one just checked: not checked twice
            run_dir = execute(spec, raw, spec_path, model_override=model_override, out_dir=out_dir, progress=progress,
                              models=models, overrides=list(sets), plan=plan_)
        except Exception as exc:
            exc.spec_path = spec_path
            raise
        if main_process:
            click.echo(str(run_dir))
    _leave(0)  # everything is written: skip the interpreter's teardown (see ``run``)


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
@_handled("run_dir")
def report(run_dir: str) -> None:
    """Re-render RUN_DIR's report from its files, without the model (refused if they changed since the run)."""
    from . import store
    from .report import write_report

    store.check_status(run_dir, store.read_manifest(run_dir))
    click.echo(str(write_report(run_dir)))


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
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]),
              help="Compile the transformer's blocks for the passes (default: the run's runtime.compile).")
@MODEL_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def causal(run_dir: str, contrast: str | None, top: int | None, units: list[int] | None, specificity: str | None,
           intervention: str, random_sets: int, seed: int, images: int, batch_size: int | None,
           compile_: str | None, model_override: str | None, quiet: bool) -> None:
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
                  random_sets=random_sets, seed=seed, images=images, model=model_override, batch_size=batch_size,
                  compile=compile_)
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
