"""The plantain experiment as a user would write it with diffusers alone: the whole-process baseline.

One pipeline call for the reference image, then one image-conditioned pipeline call per probe
prompt (each re-encodes its prompt and the reference and decodes its output), with PyTorch forward
pre-hooks that compute per-unit RMS and copy them to the host; then the paired t and the card's 200
random sign flips in numpy. Run as its own process by ``bench_plantain.py --processes``; prints one
JSON line of phase times (the weight build/load is timed apart, as for ``otherview exec``).

Usage: ``python benchmarks/naive_plantain.py [--spec specs/plantain.toml] [--model builtin:klein-4b]``.
Only ``builtin:`` random-weight models and local folders are supported (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "plantain.toml"))
    ap.add_argument("--model", default="builtin:klein-4b")
    ap.add_argument("--out", help="write the per-pass RMS here (.npy)")
    args = ap.parse_args()
    spec = tomllib.loads(Path(args.spec).read_text())
    times: dict[str, float] = {}

    start = time.perf_counter()
    if args.model.startswith("builtin:"):
        from otherview.model import build_builtin  # random weights: the only way to get them here

        pipe = build_builtin(args.model.split(":", 1)[1], dtype=DTYPE, device=DEVICE)
    else:
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(args.model, dtype=DTYPE).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    _sync()
    times["load_model"] = time.perf_counter() - start
    times["before_load"] = start - t0

    ref, probe, g = spec["reference"], spec.get("probe", {}), spec.get("capture", {}).get("unit_width", 16)
    layers = (9, 18, 27) if args.model == "builtin:klein-4b" else None
    extra = {"text_encoder_out_layers": layers} if layers else {}
    size = dict(height=ref["height"], width=ref["width"])
    if args.model == "builtin:tiny":
        size = dict(height=64, width=64)
        extra = {"text_encoder_out_layers": (1, 2, 3)}
    start = time.perf_counter()
    image = pipe(prompt=ref["prompt"], num_inference_steps=ref["steps"], guidance_scale=ref["guidance_scale"],
                 generator=torch.Generator("cpu").manual_seed(ref["seed"]), **size, **extra).images[0]
    _sync()
    times["reference"] = time.perf_counter() - start

    sites = [f"transformer_blocks.{i}.attn.to_out.0" for i in range(pipe.transformer.config.num_layers)]
    sites += [f"single_transformer_blocks.{i}.attn.to_out" for i in range(pipe.transformer.config.num_single_layers)]
    current: dict[str, np.ndarray] = {}

    def make_hook(name):
        def hook(module, inputs):
            x = inputs[0]
            rms = x.float().pow(2).reshape(x.shape[0], x.shape[1], -1, g).mean(dim=(1, 3)).sqrt()
            current[name] = rms.cpu().numpy()
        return hook

    handles = [pipe.transformer.get_submodule(s).register_forward_pre_hook(make_hook(s)) for s in sites]
    axis = spec["axis"]
    conditions = [spec["contrast"]["a"], spec["contrast"]["b"]]
    rows = {c: [] for c in conditions}
    start = time.perf_counter()
    with torch.no_grad():
        for filler in axis["fillers"]:
            for c in conditions:
                prompt = spec["conditions"][c].replace("{" + axis["slot"] + "}", filler["value"])
                current.clear()
                pipe(image=image, prompt=prompt, num_inference_steps=probe.get("steps", 1),
                     guidance_scale=probe.get("guidance_scale", 1.0),
                     generator=torch.Generator("cpu").manual_seed(probe.get("seed", 0)), **size, **extra)
                rows[c].append(np.concatenate([current[s][0] for s in sites]))
    _sync()
    times["probe"] = time.perf_counter() - start
    for h in handles:
        h.remove()

    start = time.perf_counter()
    d = np.stack(rows[conditions[0]]).astype(np.float64) - np.stack(rows[conditions[1]])
    n = d.shape[0]
    t = d.mean(0) / (d.std(0, ddof=1) / np.sqrt(n) + 1e-30)
    rng = np.random.default_rng(spec.get("null", {}).get("seed", 0))
    flips = rng.choice([-1.0, 1.0], size=(spec.get("null", {}).get("flips", 200), n))
    s = flips @ d
    q = (d ** 2).sum(0)
    t_null = s / n / np.sqrt(np.maximum(q / n - (s / n) ** 2, 1e-30) * n / (n - 1) / n)
    counts = {c: int((np.abs(t) > c).sum()) for c in (3.0, 5.0)}
    null_counts = {c: float((np.abs(t_null) > c).sum(1).mean()) for c in (3.0, 5.0)}
    times["statistics"] = time.perf_counter() - start
    if args.out:
        np.save(args.out, np.stack(rows[conditions[0]] + rows[conditions[1]]))
    times["total_after_load"] = time.perf_counter() - t0 - times["load_model"]
    print(json.dumps({"naive": times, "over": {str(k): v for k, v in counts.items()},
                      "null_mean": {str(k): v for k, v in null_counts.items()}}), flush=True)


if __name__ == "__main__":
    main()
