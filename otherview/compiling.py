"""Compile policy: regional compilation of the transformer, a visible compile cache, and ``compile = "auto"``.

Three decisions live here, each made once and recorded:

- **What is compiled.** Only the transformer's repeated blocks (diffusers' ``compile_repeated_blocks``;
  ``Flux2TransformerBlock`` and ``Flux2SingleTransformerBlock``): one graph per block class and input
  shape, reused by every block of that class, instead of one whole-model graph. On an H100 this
  compiled Klein 4B in 20.8 s against 62.0 s for the whole model, at the same speed (127.5 vs 126.1
  ms a sample); with the 25 capture hooks inside, `exec` compiles 2 graphs in 18.1 s (4.5 s warm). Capture hooks are traced into the block graphs; ``capture.attach`` keeps per-site
  state out of guarded Python values so the graph is not recompiled per site.
- **Where compiled artefacts go.** torch's own caches (inductor's FX-graph and AOTAutograd caches,
  and Triton's kernels beneath them) are pointed at ``$OTHERVIEW_CACHE/inductor`` (default
  ``~/.cache/otherview``), a folder a user can see and delete. Beside it, one small JSON marker per
  compile key (model config, shapes, capture layout, torch, GPU, backend) says that key was compiled
  on this machine and how long its compile took, cold and warm.
- **Whether compiling pays.** ``auto`` compares the time compilation would save on the plan's probe
  evaluations with what it costs: a cold compile, or the measured time of a warm one where the
  marker says the cache holds it. The reference generation always runs eager (one graph per
  shape: its few evaluations never repay a compile of their own).

The interpreter calls :func:`decide` once the batch size is known, then :func:`compile_blocks` when
the decision says so, times the probe batches with :class:`BatchClock` (the first batch compiles)
and stores ``decision.record()`` in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .startup import cache_root  # noqa: F401  (re-exported: the cache folder every part of otherview uses)

log = logging.getLogger(__name__)

# Calibration (H100 80GB, torch 2.11, Klein 4B, batch 20 at the probe shape, capture hooks on the 25
# sites; benchmarks/results/h100_processes.jsonl): eager 175 ms a sample for ~76.7 TFLOP, i.e. ~440
# TFLOP/s in effect; compiled blocks save ~27% (plantain's 60 passes: 10.8 s eager, 7.8 s compiled).
# `otherview exec` measured the compile (first batch minus a steady one) at 18.1 s with an empty
# cache and 4.5 s with a warm one, 2 graphs either way.
EAGER_FLOPS_PER_S = 440e12
COMPILED_SAVING = 0.27
COLD_COMPILE_S = 18.0  # a cold regional compile of both block classes at one shape
WARM_COMPILE_S = 4.5  # a warm one (dynamo trace + cache load), until this machine has measured its own
SCHEMA = 1


def use_cache_dir() -> Path:
    """Point torch's inductor (and Triton) caches at ``cache_root()/inductor`` and return that folder.

    A ``TORCHINDUCTOR_CACHE_DIR`` the user set is kept (and returned). torch writes its own default
    into that variable the first time it asks for the folder, so a value equal to that default is
    not taken as the user's.
    """
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            is_default = os.path.abspath(current) == os.path.abspath(default_cache_dir())
        except ImportError:  # an older torch: treat the value as the user's
            is_default = False
        if not is_default:
            return Path(current)
    folder = cache_root() / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # inductor puts Triton's cache beneath it
    return folder


@dataclass
class CompileDecision:
    """Whether and how the transformer is compiled for a run's probe passes, and why."""

    setting: str  # the spec's runtime.compile: "auto", "on" or "off"
    compile: bool  # the probe passes run with compiled blocks
    reason: str  # one line a user can read
    backend: str = "inductor"
    mode: str = "regional"  # "regional": the repeated blocks; "whole": the whole transformer
    reference: str = "eager"  # the reference generation never compiles a graph of its own
    key: str | None = None  # the compile key's hash (the marker's file name)
    cache_dir: str | None = None  # torch's inductor cache, where the compiled artefacts are
    cache_state: str = "n/a"  # "warm": this machine compiled this key before; "cold"; "n/a"
    estimate: dict[str, float] = field(default_factory=dict)  # seconds: eager, saving, compile cost
    compile_seconds: float | None = None  # measured by BatchClock.finish (first batch minus a steady one)
    graphs: int | None = None  # graphs dynamo built in the probe phase (per block class and shape)

    def record(self) -> dict[str, Any]:
        """Return the decision as a JSON-ready dict for the run's manifest."""
        return asdict(self)


def compile_key(arch_config: dict, shapes: dict, backend: str, device: torch.device) -> dict[str, Any]:
    """Return what a compiled graph depends on: model config, input shapes, backend, torch and GPU."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    config = {k: v for k, v in sorted(arch_config.items()) if not k.startswith("_")}
    return {"schema": SCHEMA, "model": config, "shapes": shapes, "backend": backend, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": gpu, "capability": list(cap) if cap else None}


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _marker(key_hash: str) -> Path:
    return cache_root() / "compiled" / f"{key_hash}.json"


def _probe_flops(arch_config: dict, tokens: int) -> float:
    """Return the forward FLOPs of one sample: 2 x weights x tokens plus attention's two products."""
    hidden = int(arch_config["num_attention_heads"]) * int(arch_config["attention_head_dim"])
    mlp = float(arch_config.get("mlp_ratio", 3.0))
    layers = int(arch_config["num_layers"]) + int(arch_config["num_single_layers"])
    # Per layer and token: QKV + out (4 h^2), gated MLP in (2 x mlp x h^2) and out (mlp x h^2).
    weights = layers * hidden * hidden * (4 + 3 * mlp)
    return 2.0 * weights * tokens + 4.0 * layers * tokens * tokens * hidden


def decide(setting: str, device: torch.device, arch_config: dict, batch_size: int, tokens: int,
           evaluations: int, capture_layout: dict, backend: str = "inductor") -> CompileDecision:
    """Return whether to compile the transformer's blocks for the probe passes, and why.

    Parameters
    ----------
    setting : {"auto", "on", "off"}
        The spec's ``runtime.compile``.
    device : torch.device
        Where the passes run; ``auto`` never compiles off CUDA.
    arch_config : dict
        The transformer's config (part of the compile key; sizes the FLOP estimate).
    batch_size, tokens : int
        The probe batch's shape: samples and sequence length (text + target + reference tokens).
    evaluations : int
        Transformer evaluations of one sample over the whole run (passes x steps x CFG factor),
        i.e. how much work a compiled graph would speed up.
    capture_layout : dict
        What the hooks do (sites, unit width, segments): hooks are traced into the graph.
    backend : str
        The ``torch.compile`` backend.
    """
    shapes = {"batch": batch_size, "tokens": tokens}
    if setting == "off":
        return CompileDecision(setting, False, "runtime.compile = 'off'", backend)
    cache = use_cache_dir()
    key = compile_key(arch_config, {**shapes, "capture": capture_layout}, backend, device)
    key_hash = _key_hash(key)
    marker = _read_marker(key_hash)
    state = "warm" if marker is not None and any(cache.iterdir()) else "cold"
    eager = evaluations * _probe_flops(arch_config, tokens) / EAGER_FLOPS_PER_S
    saving = eager * COMPILED_SAVING
    if state == "warm":
        cost = float(marker.get("warm_seconds") or WARM_COMPILE_S)
    else:
        cost = COLD_COMPILE_S
    estimate = {"eager_probe_s": round(eager, 2), "saving_s": round(saving, 2), "compile_cost_s": round(cost, 2)}
    base = dict(setting=setting, backend=backend, key=key_hash, cache_dir=str(cache), cache_state=state,
                estimate=estimate)
    if setting == "on":
        return CompileDecision(compile=True, reason=f"runtime.compile = 'on' ({state} cache)", **base)
    if device.type != "cuda":
        return CompileDecision(compile=False, reason=f"auto: {device.type} device (compiling pays only on CUDA)",
                               **{**base, "cache_state": "n/a"})
    if saving > cost:
        why = (f"auto: compiling saves ~{saving:.1f} s of ~{eager:.1f} s eager probe work, more than the "
               f"~{cost:.1f} s a {state} compile costs")
    else:
        why = (f"auto: eager; compiling would save ~{saving:.1f} s of ~{eager:.1f} s probe work but a {state} "
               f"compile costs ~{cost:.1f} s")
    return CompileDecision(compile=saving > cost, reason=why, **base)


def decide_for_plan(plan, setting: str, device: torch.device, batch_size: int,
                    backend: str = "inductor", passes: int | None = None, hooks: str | None = None) -> CompileDecision:
    """Return :func:`decide`'s answer for ``plan``'s probe passes run in batches of ``batch_size``.

    ``passes`` (default: the plan's) and ``hooks`` (what else the hooks do, e.g. the causal
    follow-up's interventions; part of the key) describe other work run at the probe's shape.
    """
    tokens = plan.text_tokens + plan.target_tokens + plan.reference_tokens
    n = len(plan.passes) if passes is None else int(passes)
    batches = -(-n // batch_size)
    samples = batches * batch_size if batches > 1 else n  # a short last batch is padded
    evaluations = samples * max(int(plan.probe_evaluations_per_pass), 1)
    layout = {"unit_width": plan.spec.capture.unit_width,
              "sites": sorted({(s.stream, s.kind, s.width, s.segment, s.tokens) for s in plan.sites}),
              "n_sites": len(plan.sites)}
    if hooks is not None:
        layout["hooks"] = hooks
    return decide(setting, device, plan.arch.transformer, batch_size, tokens, evaluations, layout, backend)


def _read_marker(key_hash: str) -> dict | None:
    try:
        return json.loads(_marker(key_hash).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(decision: CompileDecision, seconds: float) -> None:
    if decision.key is None:
        return
    path = _marker(decision.key)
    old = _read_marker(decision.key) or {}
    entry = {**old, "key": decision.key, "backend": decision.backend, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if decision.cache_state == "warm":
        entry["warm_seconds"] = round(seconds, 2)
    else:
        entry["cold_seconds"] = round(seconds, 2)
        entry.setdefault("warm_seconds", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2))
    tmp.replace(path)


def compile_blocks(transformer: torch.nn.Module, backend: str = "inductor") -> str:
    """Compile ``transformer``'s repeated blocks in place (static shapes); return "regional" or "whole".

    Falls back to compiling the whole module where it declares no ``_repeated_blocks``. Calling it
    again on the same module does nothing (a backend change raises ``ValueError``).
    """
    done = getattr(transformer, "_otherview_compiled", None)
    if done is not None:
        if done[0] != backend:
            raise ValueError(f"runtime.compile_backend: this model was already compiled with '{done[0]}'")
        return done[1]
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(dynamic=False, backend=backend)
        mode = "regional"
    else:
        transformer.compile(dynamic=False, backend=backend)
        mode = "whole"
    transformer._otherview_compiled = (backend, mode)
    return mode


def compile_for(decision: CompileDecision, transformer: torch.nn.Module) -> None:
    """Compile ``transformer``'s blocks in place as ``decision`` says (nothing where it says eager).

    With a warm cache inductor has nothing to compile (graphs and Triton kernels load from the
    cache), yet its backend would start a pool of compile-worker processes (one a core, each
    importing torch) at the first graph and stop it at exit; one thread is enough instead.
    """
    if not decision.compile:
        return
    if decision.cache_state == "warm" and decision.backend == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    try:
        decision.mode = compile_blocks(transformer, decision.backend)
    except ValueError as exc:  # compiled earlier with another backend (a model reused across runs)
        from .model import ModelSettingError

        raise ModelSettingError(str(exc)) from None


@contextmanager
def eager():
    """Run the enclosed calls eagerly even where blocks are compiled (no new graph for a new shape)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def probe_stance(decision: CompileDecision):
    """Return the context the probe passes run in: eager where the decision is not to compile.

    Matters where a model is reused across runs (benchmarks, tests): blocks compiled by an earlier
    run stay compiled in place, and a run that decided against compiling must not use them.
    """
    from contextlib import nullcontext

    return nullcontext() if decision.compile else eager()


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


class BatchClock:
    """Times the probe batches, so that the first batch's extra time is the compile's cost.

    No separate warm-up batch is run (at Klein 4B's probe shape one batch is ~2.5 s of work):
    the first probe batch compiles, and compile time = first batch - median of the others.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = time.perf_counter()
        self._graphs = _graph_count() if "torch._dynamo" in sys.modules else 0

    def wrap(self, on_batch: Callable | None) -> Callable:
        """Return an ``on_batch(batch, rms)`` callback that times each batch, then calls ``on_batch``."""

        def timed(*args):
            now = time.perf_counter()  # the batch's results were copied to the host: the device is idle
            self.times.append(now - self._last)
            if on_batch is not None:
                on_batch(*args)
            self._last = time.perf_counter()

        return timed

    def finish(self, decision: CompileDecision) -> None:
        """Record the measured compile cost (and graphs built) in ``decision`` and its marker."""
        if not decision.compile or not self.times:
            return
        rest = sorted(self.times[1:])
        steady = rest[len(rest) // 2] if rest else 0.0
        seconds = max(self.times[0] - steady, 0.0)
        decision.compile_seconds = round(seconds, 2)
        decision.graphs = _graph_count() - self._graphs
        _write_marker(decision, seconds)


_RELEASING: "threading.Thread | None" = None


def release(background: bool = False, wait: float = 0.5) -> None:
    """Stop inductor's compile workers (subprocesses) so that nothing outlives the run.

    inductor keeps a pool of compile-worker processes once it has compiled anything, and stopping
    it waits for each worker to exit. ``background=True`` starts that in a thread and returns (the
    interpreter calls it right after the probe phase, so the wait overlaps the statistics and the
    report); otherwise it waits at most ``wait`` seconds: the workers have been told to stop by
    then and leave on their own. Does nothing where inductor was never imported.
    """
    global _RELEASING
    if "torch._inductor.async_compile" not in sys.modules:
        return  # never compiled: importing inductor now would only cost time
    if _RELEASING is None:
        import threading

        def stop() -> None:
            try:
                from torch._inductor.async_compile import shutdown_compile_workers

                shutdown_compile_workers()
            except Exception as exc:  # never let cleanup hide the run's own result
                log.debug("shutting down compile workers: %s", exc)

        _RELEASING = threading.Thread(target=stop, name="otherview-release", daemon=True)
        _RELEASING.start()
    if not background:
        _RELEASING.join(wait)
