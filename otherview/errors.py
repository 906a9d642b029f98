"""One error hierarchy for everything a user can meet, with the exit code each maps to.

Exit codes (the CLI is the one place that turns an error into one):

====  =====================================================================================
0     success
1     a bug in otherview (its traceback is shown)
2     a problem the user can fix in the spec or its inputs (spec, images, output paths, a run
      directory that is corrupt, tampered with or not resumable)
3     the model or device is not available or not usable here (missing weights, no CUDA, a run
      that does not fit the GPU memory it may use, a model that produces NaN or inf)
130   interrupted by SIGINT (the run directory says ``interrupted``)
143   interrupted by SIGTERM (the run directory says ``interrupted``)
====  =====================================================================================

Modules keep their own exception classes (``SpecError``, ``PlanError``, ``ModelUnavailable``...);
:func:`exit_code` knows which category each belongs to. Every message names the file and, where
there is one, the dotted spec path (``specs/x.toml: null.flips: ...``).
"""

from __future__ import annotations

import signal

EXIT_BUG = 1
EXIT_USER = 2
EXIT_UNAVAILABLE = 3


class OtherviewError(Exception):
    """A known failure: ``problems`` are ``(dotted path, message)`` pairs, reported against ``source``."""

    exit_code = EXIT_BUG

    def __init__(self, message: str = "", source: str | None = None, problems: list[tuple[str, str]] | None = None):
        self.source = source
        self.problems = list(problems) if problems else [("", message)]
        super().__init__(message or "; ".join(m for _, m in self.problems))

    def format(self) -> str:
        """Return one ``file: path: message`` line per problem."""
        return format_problems(self.source, self.problems)


class UserError(OtherviewError):
    """The spec or one of its inputs (image, output path) must change: exit 2."""

    exit_code = EXIT_USER


class RunDirError(UserError):
    """A run directory is corrupt, tampered with, still running, or cannot be resumed: exit 2."""


class Unavailable(OtherviewError):
    """The model or device is not available or not usable here: exit 3."""

    exit_code = EXIT_UNAVAILABLE


class NonFiniteError(Unavailable):
    """NaN or inf where values must be finite (reference image, activations): exit 3.

    The spec was valid and the model ran, but with these weights, this dtype and this device it
    produced values no statistic can use; the fix is the model, its dtype or the guidance.
    """


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached a run: it is marked ``interrupted`` and exits 128 + the signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def format_problems(source: str | None, problems) -> str:
    """Return ``source: path: message`` lines (the path left out where there is none)."""
    head = f"{source}: " if source else ""
    return "\n".join(f"{head}{p}: {m}" if p else f"{head}{m}" for p, m in problems)


def exit_code(exc: BaseException) -> int | None:
    """Return the exit code of a known error, or None for a bug (which keeps its traceback)."""
    from .capture import CaptureError
    from .design import DesignError
    from .model import ModelSettingError, ModelUnavailable
    from .plan import PlanError
    from .spec import SpecError

    if isinstance(exc, (OtherviewError, Interrupted)):
        return exc.exit_code
    if isinstance(exc, (SpecError, DesignError, PlanError, CaptureError, ModelSettingError)):
        return EXIT_USER
    if isinstance(exc, ModelUnavailable):
        return EXIT_UNAVAILABLE
    return None


def message(exc: BaseException, source: str | None) -> str:
    """Return the lines a known error prints: every problem against ``source`` (a file)."""
    from .spec import SpecError

    if isinstance(exc, SpecError):
        return exc.format()
    if isinstance(exc, OtherviewError):
        return format_problems(exc.source or source, exc.problems)
    problems = getattr(exc, "problems", None)
    if problems:
        return format_problems(source, problems)
    return format_problems(source, [("", str(exc))])
