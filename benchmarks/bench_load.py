"""Loading a pipeline saved with ``save_pretrained`` straight onto the GPU vs reading its bytes from disk.

1. Build ``builtin:klein-4b`` (random weights, bf16) on the GPU and ``save_pretrained`` it into
   ``--folder`` (skipped when the folder already holds one).
2. Drop the page cache (where this process may: root on a Linux machine) and time reading every
   file of the folder into host memory: the disk's time for those bytes.
3. Drop the page cache again and time ``otherview.model.load(folder, device="cuda")`` (diffusers'
   ``device_map="cuda"``: each safetensors file is read into device memory as it is loaded).
4. Optionally (``--old``) the previous path: load on the host, then ``.to("cuda")``.

Writes JSON lines to ``$OUT/bench_load.jsonl`` and prints a short table. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otherview import model as model_mod, store  # noqa: E402


def drop_caches() -> bool:
    """Return whether the page cache was dropped (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(folder: Path) -> tuple[int, float]:
    """Return the bytes of every file under ``folder`` and the seconds it took to read them."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
    return total, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/klein-4b-saved")
    ap.add_argument("--old", action="store_true", help="also time the host load + .to('cuda') path")
    args = ap.parse_args()
    folder = Path(args.folder)
    rows = []
    base = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "git_sha": store.git_sha(ROOT)}
    if not (folder / "model_index.json").exists():
        start = time.perf_counter()
        pipe = model_mod.build_builtin("klein-4b", dtype=torch.bfloat16, device="cuda")
        pipe.save_pretrained(folder)
        meta = json.loads((ROOT / "otherview" / "configs" / "klein-4b" / model_mod.MARKER).read_text())
        (folder / model_mod.MARKER).write_text(json.dumps({**meta, "random_weights": True}))
        del pipe
        torch.cuda.empty_cache()
        rows.append({**base, "what": "build + save_pretrained", "seconds": time.perf_counter() - start})
    dropped = drop_caches()
    nbytes, read_s = read_all(folder)
    rows.append({**base, "what": "read every file from disk", "seconds": read_s, "bytes": nbytes,
                 "gb_per_s": nbytes / read_s / 1e9, "page_cache_dropped": dropped})
    variants = [("load straight onto the GPU (device_map)", None)]
    if args.old:
        variants.append(("load on the host, then .to('cuda')", "old"))
    for name, how in variants:
        dropped = drop_caches()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if how == "old":
            from diffusers import Flux2KleinPipeline

            pipe = Flux2KleinPipeline.from_pretrained(str(folder), dtype=torch.bfloat16).to("cuda")
        else:
            pipe = model_mod.load(str(folder), "bfloat16", "cuda").pipe
        torch.cuda.synchronize()
        sec = time.perf_counter() - start
        on_gpu = all(p.is_cuda for m in (pipe.transformer, pipe.text_encoder, pipe.vae) for p in m.parameters())
        rows.append({**base, "what": name, "seconds": sec, "vs_read": sec / read_s, "all_on_gpu": on_gpu,
                     "page_cache_dropped": dropped})
        del pipe
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    for r in rows:
        print(json.dumps(r), flush=True)
        if out:
            with open(os.path.join(out, "bench_load.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
    for r in rows:
        extra = f"  {r['vs_read']:.2f}x the read" if "vs_read" in r else (f"  {r['gb_per_s']:.2f} GB/s" if "gb_per_s" in r else "")
        print(f"{r['what']:<45} {r['seconds']:8.2f} s{extra}")


if __name__ == "__main__":
    main()
