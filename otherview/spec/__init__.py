"""The spec language: TOML text -> validated ``Spec`` (pydantic v2), with every user error collected.

A spec describes one paired-prompt probe: the model, a fixed reference image, prompt templates over
one slot axis (the fillers, each with covariates), the contrast that forms a pair, the probe-pass
settings, what to capture, the null, and where the run goes. Unknown keys are errors. Errors are
reported as ``file: dotted.path: message``, all at once (see ``SpecError``).

One way down: ``load`` (text, files, ``--set``) -> ``rules`` (cross-field checks) -> ``models``
(the sections). Everything a caller needs is importable from ``otherview.spec``.
"""

from .load import (MAX_SPEC_BYTES, SCHEMA_DIALECT, apply_sets, json_schema, load_spec, parse_set, parse_spec,
                   resolve_paths, spec_hash, validate_raw, with_overrides, with_sets)
from .models import (DTYPES, MEMORY_SIZE, NAME, OUTPUT_PLACEHOLDERS, SEED_MAX, SEGMENTS, Axis, Capture, Contrast,
                     Experiment, Filler, ModelSpec, Null, Output, Probe, Reference, Runtime, Scene, Spec, SpecError,
                     Specificity)

__all__ = ["MAX_SPEC_BYTES", "SCHEMA_DIALECT", "apply_sets", "json_schema", "load_spec", "parse_set", "parse_spec",
           "resolve_paths", "spec_hash", "validate_raw", "with_overrides", "with_sets", "DTYPES", "MEMORY_SIZE",
           "NAME", "OUTPUT_PLACEHOLDERS", "SEED_MAX", "SEGMENTS", "Axis", "Capture", "Contrast", "Experiment",
           "Filler", "ModelSpec", "Null", "Output", "Probe", "Reference", "Runtime", "Scene", "Spec", "SpecError",
           "Specificity"]
