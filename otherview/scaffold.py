"""``otherview new NAME``: a commented spec to start from, one that validates as written.

The template is a small but complete design: an effect contrast, a control contrast (a second
wording of the same mention) and the specificity test between them, because a contrast alone
cannot tell a concept from the token difference of its two templates (see the README's caution).
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = '''\
# {name}: a paired-prompt probe (otherview spec). Every key is documented in `otherview schema`;
# check this file with `otherview validate {name}.toml`, see what would run with
# `otherview plan {name}.toml --model builtin:tiny`, run it with `otherview exec {name}.toml`.
# Relative paths in this file (output.dir, reference.image) are relative to this file's folder.

[experiment]
name = "{name}"
description = "What this probe asks, in one sentence."

[model]
# A hub id, a local folder, or a built-in random-weight model (builtin:tiny runs on a CPU in
# seconds; builtin:klein-4b is the full architecture). `otherview sites --model M` lists what
# each model can capture.
source = "black-forest-labs/FLUX.2-klein-base-4B"
dtype = "auto"                  # bfloat16 on CUDA, float32 on the CPU
device = "auto"
max_sequence_length = 512       # text tokens per prompt; longer prompts are an error

[reference]
# The fixed image every probe pass is conditioned on: prompt (generated once), image (a file),
# or [[reference.scenes]] (several, a replication factor). Exactly one of the three.
prompt = "A photographic kitchen scene, no people present"
steps = 14
guidance_scale = 4.0
seed = 0
height = 1024
width = 1024

[axis]
# The items: each filler is run in every condition; the statistics treat them as the sample
# (sign flips act on items). At least 6 for an exact null to reach p <= 0.05; 20-30 is better.
name = "creature"               # singular: what one filler is
slot = "creature"               # the {{creature}} slot of the templates
fillers = [
  {{ value = "a cat", rank = 1 }},
  {{ value = "a dog", rank = 2 }},
  {{ value = "a horse", rank = 3 }},
  {{ value = "a parrot", rank = 4 }},
  {{ value = "a snake", rank = 5 }},
  {{ value = "a bee", rank = 6 }},
  {{ value = "a bat", rank = 7 }},
  {{ value = "an octopus", rank = 8 }},
]

[conditions]
# One template per condition (or a list of wordings, paired by position across conditions).
viewpoint = "Render this kitchen from the viewpoint of {{creature}}"
mention = "Render this kitchen with {{creature}} in it"
mention_alt = "Render this kitchen, and {{creature}} is in it"

# Contrasts: weights over conditions, summing to 0. The control contrast differs in wording only,
# so a unit that responds to the effect beyond the control responds to more than the words.
[[contrasts]]
name = "effect"
weights = {{ viewpoint = 1, mention = -1 }}

[[contrasts]]
name = "control"
weights = {{ mention_alt = 1, mention = -1 }}

[[specificity]]
name = "viewpoint_beyond_wording"
effect = "effect"
control = "control"

[probe]
steps = 1                       # one evaluation from pure noise: only the reference carries the scene
guidance_scale = 1.0
seed = 0                        # or a list of seeds (a replication factor)
batch_size = "auto"
capture_steps = "mean"          # "each": analyse every step apart

[capture]
# Roles ("attention-out image", "attention-out text", "single out") or module-name patterns.
sites = ["attention-out image", "single out"]
unit_width = 16                 # channels per unit, or "head"
tokens = "all"                  # all | text | image | target | reference

[null]
method = "auto"                 # exact where affordable, else `flips` random sign flips
flips = 10000
seed = 0
thresholds = [3.0, 5.0]
quantile = 0.99
alpha = 0.05

[output]
dir = "runs/{{name}}"            # {{name}} is experiment.name; one <UTC time> folder per run
'''


def spec_text(name: str) -> str:
    """Return the commented spec of a new experiment called ``name``."""
    return TEMPLATE.format(name=name)


def check_name(name: str) -> str | None:
    """Return why ``name`` cannot name an experiment, or None when it can."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
        return "should start with a letter, digit or '_' and hold only letters, digits, '_', '.' and '-'"
    return None


def write_new(name: str, folder: str | Path = ".", force: bool = False) -> Path:
    """Write ``<folder>/<name>.toml`` (``name`` may end in ``.toml``) and return its path.

    Raise ``ValueError`` for a name that cannot name an experiment and ``FileExistsError`` where the
    file exists (unless ``force``).
    """
    stem = name[:-5] if name.endswith(".toml") else name
    problem = check_name(stem)
    if problem:
        raise ValueError(f"'{stem}' {problem}")
    path = Path(folder) / f"{stem}.toml"
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (--force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec_text(stem))
    return path
