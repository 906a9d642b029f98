"""Everything about a spec that can be checked before any weight is loaded, all problems at once.

``validate``, ``plan`` and ``exec`` call :func:`preflight`: reference image files, the output path,
the device, the runtime backends, the model's text-encoder layers and the cost of the null. A
problem is ``(dotted path, message, exit code)``: 2 for what the spec must change, 3 for a device
that is not here. The spec's own rules (types, ranges, names) are ``spec``'s; the fit of the design
to the model is ``plan``'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from .errors import EXIT_UNAVAILABLE, EXIT_USER, Unavailable, UserError

#: An exact null estimated to take longer than this is refused before any work, with the way out.
MAX_NULL_SECONDS = 3600.0
#: Backends that run on the CPU; every other diffusers backend needs CUDA (flash, sage, xformers...).
CPU_ATTENTION_BACKENDS = {"default", "native", "_native_math", "flex"}
#: torch.compile backends torch itself always registers: naming one is checked without importing
#: torch._dynamo, whose ``list_backends`` imports every backend module to list them (1-3 s; AOTAutograd
#: among them). A test keeps this a subset of ``list_backends``.
TORCH_COMPILE_BACKENDS = ("inductor", "eager", "aot_eager")

Problem = tuple[str, str, int]


def raise_problems(problems: list[Problem], source: str) -> None:
    """Raise one error holding every problem: exit 2 if any is the user's to fix, else 3."""
    if not problems:
        return
    cls = UserError if any(code == EXIT_USER for _, _, code in problems) else Unavailable
    raise cls(source=source, problems=[(p, m) for p, m, _ in problems])


def resolve_images(spec, spec_path: str):
    """Return ``spec`` with its reference images resolved and checked, and the problems found."""
    from .probes import resolve_images as resolve
    from .plan import PlanError

    problems: list[Problem] = []
    try:
        return resolve(spec, spec_path), problems
    except PlanError as exc:
        problems += [(p, m, EXIT_USER) for p, m in exc.problems]
    # One bad image hides the others in ``resolve``: check each on its own to name them all.
    from .probes import resolve_image

    ref = spec.reference
    images = [("reference.image", ref.image)] + [(f"reference.scenes[{k}].image", sc.image)
                                                for k, sc in enumerate(ref.scenes or [])]
    for where, image in images[1:] if ref.image is not None else images:
        if image is None:
            continue
        try:
            resolve_image(image, spec_path, where)
        except PlanError as exc:
            problems += [(p, m, EXIT_USER) for p, m in exc.problems if (p, m, EXIT_USER) not in problems]
    return spec, problems


def output_problems(spec, out_dir: str | None) -> list[Problem]:
    """Return problems with where the run directory will go: a file in the way, or a folder not writable."""
    from .store import run_base

    where = "--out" if out_dir else "output.dir"
    try:
        base = run_base(out_dir or spec.output.dir, spec.experiment.name)
    except ValueError as exc:
        return [("experiment.name", str(exc), EXIT_USER)]
    path = base.expanduser()
    while not path.exists():
        if path.is_symlink():  # a dangling link
            return [(where, f"'{path}' is a broken symbolic link", EXIT_USER)]
        if path.parent == path:
            break
        path = path.parent
    if not path.is_dir():
        return [(where, f"'{path}' is a file, not a directory: the run directory cannot be made under '{base}'",
                 EXIT_USER)]
    if not os.access(path, os.W_OK | os.X_OK):
        return [(where, f"'{path}' is not writable: the run directory cannot be made under '{base}'", EXIT_USER)]
    return []


def device_problems(spec) -> list[Problem]:
    """Return problems with the spec's device on this machine (exit 3: not here)."""
    device = spec.model.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [("model.device", f"'{device}' was asked for but this torch sees no CUDA device; use 'cpu' or "
                                 "'auto'", EXIT_UNAVAILABLE)]
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        return [("model.device", f"'{device}': this machine has {torch.cuda.device_count()} CUDA device(s)",
                 EXIT_UNAVAILABLE)]
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return [("model.device", "'mps' was asked for but this torch has no MPS device (Apple GPUs only); use "
                                 "'cpu' or 'auto'", EXIT_UNAVAILABLE)]
    return []


def runtime_problems(spec, device: torch.device) -> list[Problem]:
    """Return problems with the runtime backends: unknown names, or a CUDA-only backend on another device."""
    from .model import ModelSettingError, check_attention_backend

    problems: list[Problem] = []
    rt = spec.runtime
    try:
        check_attention_backend(rt.attention_backend)
    except ModelSettingError as exc:
        problems.append(("runtime.attention_backend", str(exc).split(": ", 1)[-1], EXIT_USER))
    else:
        if device.type != "cuda" and rt.attention_backend not in CPU_ATTENTION_BACKENDS:
            problems.append(("runtime.attention_backend", f"'{rt.attention_backend}' needs a CUDA device; this run is "
                             f"on {device.type}: use 'default'", EXIT_USER))
    if rt.compile_backend not in TORCH_COMPILE_BACKENDS:
        problems += _compile_backend_problems(rt.compile_backend)
    return problems


def _compile_backend_problems(name: str) -> list[Problem]:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name in known:
        return []
    return [("runtime.compile_backend", f"unknown torch.compile backend '{name}' (known: "
             f"{', '.join(b for b in known if 'TESTING' not in b)})", EXIT_USER)]


def with_text_encoder_layers(spec, arch):
    """Return ``arch`` with the spec's ``model.text_encoder_out_layers`` applied, and the problems found.

    The pipeline stacks these hidden states of the text encoder into the transformer's text input, so
    there must be ``joint_attention_dim / hidden_size`` of them, each a state the encoder has.
    """
    layers = spec.model.text_encoder_out_layers
    if layers is None:
        return arch, []
    te = arch.text_encoder or {}
    hidden, n_layers = te.get("hidden_size"), te.get("num_hidden_layers")
    joint = arch.transformer.get("joint_attention_dim")
    problems: list[Problem] = []
    where = "model.text_encoder_out_layers"
    if isinstance(n_layers, int):
        bad = [x for x in layers if x > n_layers]
        if bad:
            problems.append((where, f"{bad} beyond the text encoder's hidden states 0..{n_layers}", EXIT_USER))
    if isinstance(hidden, int) and isinstance(joint, int) and len(layers) * hidden != joint:
        problems.append((where, f"{len(layers)} layers x hidden size {hidden} = {len(layers) * hidden}, but the "
                                f"transformer takes {joint} text channels: give {joint // hidden} layers", EXIT_USER))
    if len(set(layers)) < len(layers):
        problems.append((where, "repeats a layer", EXIT_USER))
    return (arch if problems else replace(arch, text_encoder_out_layers=tuple(layers))), problems


def estimate_null_seconds(n_pairs: int, n_units: int, device: torch.device) -> float:
    """Return the estimated seconds of one exact sign-flip null (2^(n_pairs-1) flips x n_units)."""
    from .ops import signflip

    estimate = getattr(signflip, "estimate_null_seconds", None)
    if estimate is not None:
        try:
            return float(estimate(n_pairs, n_units, device))
        except TypeError:  # another signature: fall back to the budget's rate
            pass
    kind = "cuda" if device.type == "cuda" else "cpu"
    # UNIT_FLIP_BUDGET is calibrated as a few seconds' work at the measured rate (see its comment).
    rate = signflip.UNIT_FLIP_BUDGET[kind] / 6.0
    log2 = max(n_pairs - 1, 0) + math.log2(max(n_units, 1)) - math.log2(rate)
    return math.inf if log2 > 1000 else 2.0 ** log2


def null_problems(spec, plan, device: torch.device) -> list[Problem]:
    """Return problems with the null's cost: an exact null too long to wait for, named with its estimate."""
    from .ops import signflip
    from .stats import choose_method

    n, units = plan.flips["pairs"], plan.n_units
    method = choose_method(spec.null.method, n, units, device)
    analyses = max(len(plan.design.analyses), 1)
    if method != "exact":
        rate = signflip.UNIT_FLIP_BUDGET["cuda" if device.type == "cuda" else "cpu"] / 6.0
        seconds = analyses * spec.null.flips * units / rate
        if seconds > MAX_NULL_SECONDS:
            return [("null.flips", f"{spec.null.flips:,} random flips x {units:,} units x {analyses} analyses would "
                                   f"take about {_duration(seconds)} on {device.type}, over the "
                                   f"{_duration(MAX_NULL_SECONDS)} budget; use fewer flips", EXIT_USER)]
        return []
    if n > signflip.EXACT_MAX_PAIRS:
        return [("null.method", f"exact enumerates 2^{n - 1} sign flips for {n} pairs, more than the "
                                f"2^{signflip.EXACT_MAX_PAIRS - 1} it can; use method = 'random' (null.flips) or "
                                "'auto'", EXIT_USER)]
    seconds = estimate_null_seconds(n, units, device) * analyses
    if seconds > MAX_NULL_SECONDS:
        return [("null.method", f"the exact null ({analyses} x 2^{n - 1} flips x {units:,} units) would take about "
                                f"{_duration(seconds)} on {device.type}, over the {_duration(MAX_NULL_SECONDS)} "
                                "budget; use method = 'random' with null.flips, or 'auto' (exact only where "
                                "affordable)", EXIT_USER)]
    return []


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds > 3.15e9:
        return "more than a century"
    for unit, size in (("years", 3.15e7), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def resolved_device(spec) -> torch.device:
    """Return the device a spec runs on here (after ``device_problems`` found none)."""
    if spec.model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.model.device)


def preflight(spec, spec_path: str, model_override: str | None = None, out_dir: str | None = None):
    """Return ``(spec, plan)`` with every pre-weights check passed; raise one error naming all problems.

    ``spec`` comes back with the model override applied and its images resolved.
    """
    from .design import DesignError, build_design
    from .model import ModelUnavailable, architecture
    from .plan import PlanError, build_plan

    if model_override:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": model_override})})
    spec, problems = resolve_images(spec, spec_path)
    problems += output_problems(spec, out_dir)
    problems += device_problems(spec)
    device = None if any(p == "model.device" for p, _, _ in problems) else resolved_device(spec)
    if device is not None:
        problems += runtime_problems(spec, device)
    plan = design = None
    try:
        design = build_design(spec)
    except DesignError as exc:
        problems += [(p, m, EXIT_USER) for p, m in exc.problems]
    try:
        arch = architecture(spec.model.source)
    except ModelUnavailable as exc:
        problems.append(("model.source", str(exc), EXIT_UNAVAILABLE))
        arch = None
    if arch is not None:
        arch, more = with_text_encoder_layers(spec, arch)
        problems += more
    if arch is not None and design is not None:
        try:
            plan = build_plan(spec, arch, design)
        except PlanError as exc:
            problems += [(p, m, EXIT_USER) for p, m in exc.problems]
    if plan is not None and device is not None:
        problems += null_problems(spec, plan, device)
    raise_problems(list(dict.fromkeys(problems)), spec_path)
    return spec, plan

