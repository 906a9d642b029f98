"""otherview: paired-prompt probes of diffusion-transformer attention heads, from a TOML spec.

The Python API (the CLI calls the same functions)::

    import otherview
    spec = otherview.load_spec("specs/plantain.toml", set=["null.flips=500"])
    print(otherview.plan(spec, model="builtin:tiny"))       # what would run, without weights
    run = otherview.run(spec, model="builtin:tiny")          # run it; a Run
    run = otherview.load_run("runs/plantain/20260101-120000")  # or load a finished run

Imports are lazy: ``import otherview`` loads neither torch nor diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .plan import Plan
    from .runs import Run
    from .spec import Spec

__all__ = ["load_spec", "plan", "run", "load_run", "Run", "Spec", "SpecError", "__version__"]


def load_spec(path: str | Path, *, set: Sequence[str] = ()) -> "Spec":
    """Return the validated spec at ``path``.

    Parameters
    ----------
    path : str or Path
        A spec file (TOML). Its relative paths (``output.dir``, reference images) are resolved
        against the file's folder.
    set : sequence of str
        ``"dotted.path=value"`` overrides applied before validation, as ``--set`` on the command
        line; the value is read as a TOML literal (``8``, ``"8"``, ``[2.0, 4.0]``), or taken as a
        string when it is none (``model.source=builtin:tiny``).

    Returns
    -------
    spec : Spec
        Frozen pydantic model; ``spec.model_dump()`` gives it as a dict.

    Raises
    ------
    SpecError
        Every problem at once, each as ``(dotted.path, message)`` in ``.problems``.
    """
    from .spec import load_spec as _load

    return _load(path, list(set))[0]


def _spec_of(spec: "Spec | str | Path", sets: Sequence[Any]) -> tuple["Spec", str, str]:
    """Return (spec with ``sets`` applied, raw text, source path) of a spec given as a file or a ``Spec``."""
    from .spec import Spec, load_spec as _load, with_sets

    if isinstance(spec, Spec):
        return with_sets(spec, list(sets)), "# given as a Python object: see the resolved spec\n", "<spec>"
    spec_obj, raw = _load(spec, [s for s in sets if isinstance(s, str)])
    return with_sets(spec_obj, [s for s in sets if not isinstance(s, str)], str(spec)), raw, str(spec)


def _override_pairs(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    # keyword form of a dotted path: null__flips=500 is null.flips = 500
    return [(k.replace("__", "."), v) for k, v in overrides.items()]


def plan(spec: "Spec | str | Path", *, model: str | None = None, set: Sequence[str] = (), **overrides: Any) -> "Plan":
    """Return the plan of ``spec`` on a model: passes, sites, units, token counts; no weights loaded.

    Parameters
    ----------
    spec : Spec, str or Path
        A validated spec or a spec file.
    model : str, optional
        Override ``model.source`` (a hub id, a folder, ``builtin:tiny``, ``builtin:klein-4b``, ...).
    set : sequence of str
        ``"dotted.path=value"`` overrides, as in ``load_spec``.
    **overrides
        More overrides as keywords, ``__`` standing for the dot: ``null__flips=500``.

    Returns
    -------
    plan : Plan
        ``str(otherview.plan.describe(plan))`` is what ``otherview plan`` prints; ``plan.units`` lists
        every unit, ``plan.sites`` every hooked projection.

    Raises
    ------
    SpecError, DesignError, PlanError
        The spec, its design, or its fit to the model, with every problem.
    """
    from .design import build_design
    from .model import architecture
    from .plan import build_plan

    sets = list(set) + _override_pairs(overrides) + ([("model.source", model)] if model else [])
    spec_obj, _, _ = _spec_of(spec, sets)
    return build_plan(spec_obj, architecture(spec_obj.model.source), build_design(spec_obj))


def run(spec: "Spec | str | Path", *, model: str | None = None, out: str | Path | None = None,
        set: Sequence[str] = (), progress: Callable[[str], None] | None = None, **overrides: Any) -> "Run":
    """Run ``spec`` end to end (as ``otherview exec``) and return the loaded run.

    Parameters
    ----------
    spec : Spec, str or Path
        A validated spec or a spec file.
    model : str, optional
        Override ``model.source`` (``builtin:tiny`` runs anywhere in seconds).
    out : str or Path, optional
        Parent folder of the run directory (default: the spec's ``output.dir``).
    set : sequence of str
        ``"dotted.path=value"`` overrides, as ``--set``; recorded in the manifest (``overrides``).
    progress : callable, optional
        Called with one line per step of the run (default: silent).
    **overrides
        More overrides as keywords, ``__`` standing for the dot: ``probe__batch_size=4``.

    Returns
    -------
    run : Run
        The run directory, loaded (see ``load_run``).
    """
    from .interpreter import execute
    from .runs import load_run as _load_run

    sets = list(set) + _override_pairs(overrides) + ([("model.source", model)] if model else [])
    spec_obj, raw, source = _spec_of(spec, sets)
    recorded = [s if isinstance(s, str) else f"{s[0]}={s[1]!r}" for s in sets]
    run_dir = execute(spec_obj, raw, source, out_dir=None if out is None else str(out),
                      progress=progress or (lambda _msg: None), overrides=recorded)
    return _load_run(run_dir)


def load_run(path: str | Path) -> "Run":
    """Return the completed run directory at ``path`` as a ``Run``.

    Returns
    -------
    run : Run
        ``run.units`` (DataFrame, one row per analysis and unit), ``run.top(analysis, n, kind)``,
        ``run.values(units)`` (per-pass values labelled by pass), ``run.item_values(analysis, units)``
        (per-item contrast values), ``run.stats(analysis)``, ``run.null(analysis)`` (with bin edges),
        ``run.manifest`` and ``run.summary`` (typed records).

    Raises
    ------
    RunFormatError
        The directory is not a completed run of this otherview version (names what is wrong).
    """
    from .runs import load_run as _load_run

    return _load_run(path)


def __getattr__(name: str) -> Any:
    if name == "Run":
        from .runs import Run

        return Run
    if name in ("Spec", "SpecError"):
        from . import spec as _spec

        return getattr(_spec, name)
    raise AttributeError(f"module 'otherview' has no attribute {name!r}")


class _Package(__import__("types").ModuleType):
    """The package's module type: ``otherview.plan`` stays the API function.

    Importing the submodule ``otherview.plan`` (``from otherview.plan import build_plan``) would
    otherwise rebind the package attribute ``plan`` to the module. ``sys.modules["otherview.plan"]``
    still holds the module, so every ``from otherview.plan import ...`` works as before.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "plan" and isinstance(value, type(__import__("sys"))):
            return
        super().__setattr__(name, value)


__import__("sys").modules[__name__].__class__ = _Package
