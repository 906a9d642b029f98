"""Model sources: the real ``Flux2KleinPipeline.from_pretrained`` path and built-in random-weight models.

A source is a hub id, a local folder saved with ``save_pretrained``, or ``builtin:NAME`` for a
random-weight model built from configs shipped in ``otherview/configs/NAME`` (``tiny`` runs a full
spec on a CPU in seconds; ``klein-4b`` and ``klein-9b`` are the full FLUX.2 Klein 4B and 9B
architectures, for GPU benchmarks). Each config folder's ``otherview.json`` lists the hub ids of the
released variants it describes, so those plan offline. Nothing is downloaded: this module finds a
source's configs and reads them into an ``architectures.Architecture`` without allocating weights
(for ``otherview plan``), and builds or loads the pipeline (for ``otherview exec``). What the configs
mean (sites, token layout, the KV variant) is ``architectures``' business.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import logging
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .architectures import (KLEIN_PIPELINE, Architecture, ArchitectureError, pipeline_of, text_encoder_layers,  # noqa: F401
                            vae_scale)  # Architecture is imported from here by callers that predate architectures

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MARKER = "otherview.json"  # written beside a saved built-in pipeline: it carries random weights


class ModelUnavailable(Exception):
    """The model cannot be found or loaded here; the message names the fix."""


class ModelSettingError(ValueError):
    """A spec's runtime setting does not fit the model (e.g. an unknown attention backend)."""


@dataclass
class LoadedModel:
    """A pipeline ready to run, with what the manifest must say about it."""

    pipe: Any
    arch: Architecture
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. the compiled transformer, reused across runs


def builtin_names() -> list[str]:
    """Return the names of the built-in random-weight models."""
    root = resources.files("otherview") / "configs"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _builtin_dir(name: str) -> Path:
    if name not in builtin_names():
        raise ModelUnavailable(f"no built-in model '{name}' (built-in: {', '.join(builtin_names())})")
    return Path(str(resources.files("otherview") / "configs" / name))


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Return the known hub ids (lower case) -> (shipped config folder, variant entry)."""
    out = {}
    for name in builtin_names():
        for variant in _read(_builtin_dir(name) / MARKER).get("variants", []):
            out[variant["hub_id"].lower()] = (name, variant)
    return out


def known_hub_ids() -> list[str]:
    """Return the hub ids of the released models whose configs ship with otherview."""
    return sorted(v["hub_id"] for _, v in _variants().values())


def _optional(path: Path) -> dict[str, Any]:
    return _read(path) if path.exists() else {}


def _from_builtin(name: str, source: str, variant: dict[str, Any] | None = None) -> Architecture:
    folder = _builtin_dir(name)
    meta = _read(folder / MARKER)
    transformer, text_encoder = _read(folder / "transformer.json"), _read(folder / "text_encoder.json")
    layers = meta.get("text_encoder_out_layers") or text_encoder_layers(text_encoder, transformer["joint_attention_dim"])
    variant = variant or {}
    return Architecture(
        source=source, transformer=transformer, text_encoder_out_layers=tuple(layers),
        random_weights=not variant, resolution=None if variant else meta.get("resolution"),
        vae_scale_factor=vae_scale(_read(folder / "vae.json")),
        description=variant.get("description", meta.get("description", "")),
        pipeline_class=variant.get("pipeline", meta.get("pipeline", KLEIN_PIPELINE)),
        distilled=variant.get("distilled", meta.get("distilled", False)), text_encoder=text_encoder, name=name)


def _from_folder(folder: Path, source: str) -> Architecture:
    """Return the architecture of a pipeline folder (save_pretrained layout, or a hub snapshot)."""
    try:
        transformer = _read(folder / "transformer" / "config.json")
    except FileNotFoundError:
        raise ModelUnavailable(f"'{source}' is a folder but holds no transformer/config.json: is it a "
                               "pipeline saved with save_pretrained?") from None
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"'{source}': transformer/config.json is not a readable JSON config ({exc})") from None
    try:
        text_encoder = _optional(folder / "text_encoder" / "config.json")
        meta = _optional(folder / MARKER)
        if not isinstance(transformer, dict) or "joint_attention_dim" not in transformer:
            raise ValueError("transformer/config.json has no joint_attention_dim: not a FLUX.2 transformer config")
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"'{source}': {exc}") from None
    try:
        pipeline_class, distilled = pipeline_of(_optional(folder / "model_index.json"))
        layers = meta.get("text_encoder_out_layers") or text_encoder_layers(text_encoder, transformer["joint_attention_dim"])
        return Architecture(
            source=source, transformer=transformer, text_encoder_out_layers=tuple(layers),
            random_weights=bool(meta.get("random_weights", False)) or _weights_random(folder),
            resolution=meta.get("resolution"),
            vae_scale_factor=vae_scale(_optional(folder / "vae" / "config.json")), pipeline_class=pipeline_class,
            distilled=distilled, text_encoder=text_encoder, description=meta.get("description", ""))
    except (ArchitectureError, OSError, ValueError, TypeError, KeyError) as exc:  # a broken config, not a bug
        raise ModelUnavailable(f"'{source}': its configs are not a FLUX.2 Klein pipeline's ({exc})") from None


def architecture(source: str) -> Architecture:
    """Return the architecture of ``source`` from its configs alone (no weights are allocated).

    ``builtin:NAME`` reads the shipped configs; a folder reads its own; a hub id reads the local hub
    cache where the model was downloaded, and otherwise the shipped configs of a known released
    variant (FLUX.2 Klein 4B and 9B, base and distilled, 9B KV), so ``otherview plan`` works offline.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        return _from_builtin(name, source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _from_folder(folder, str(folder))
    known = _variants().get(source.lower())
    cached = _hub_cached_folder(source)
    if cached is not None:
        arch = _from_folder(cached, source)
        if known is not None and not (cached / "model_index.json").exists():  # the variant's flags, then
            arch = replace(arch, pipeline_class=known[1].get("pipeline", KLEIN_PIPELINE),
                           distilled=known[1].get("distilled"))
        return arch
    if known is not None:
        return _from_builtin(known[0], source, known[1])
    raise ModelUnavailable(_unavailable_message(source))


def _hub_cached_folder(repo_id: str) -> Path | None:
    """Return the local hub-cache snapshot of ``repo_id`` if its configs are there (nothing is downloaded)."""
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id, "transformer/config.json", local_files_only=True))
        for name in ("model_index.json", "vae/config.json", "text_encoder/config.json"):
            try:
                hf_hub_download(repo_id, name, local_files_only=True)
            except Exception:  # a missing optional config: defaults apply
                pass
    except Exception:  # not in the local cache (or not a valid id): the caller explains
        return None
    return path.parent.parent


def _unavailable_message(source: str) -> str:
    return (f"the weights of '{source}' are not on this machine and cannot be downloaded here; "
            "use --model builtin:klein-4b or builtin:klein-9b (random weights, same architecture), "
            "--model builtin:tiny, or --model /path/to/a/local/pipeline/folder "
            f"(released models planned from shipped configs: {', '.join(known_hub_ids())})")


def resolve_device(device: str) -> torch.device:
    """Return the torch device for a spec's device string ('auto' picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"device '{device}' was asked for but this torch sees no CUDA device; "
                               "use device = 'cpu' (or 'auto')")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the torch dtype for a spec's dtype string ('auto': bf16 on CUDA, fp32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def byte_tokenizer(model_max_length: int = 4096):
    """Return a byte-level Qwen2 tokenizer built locally (ByteLevel alphabet, no merges, chat template).

    Stands in for the Qwen3 tokenizer, which cannot be downloaded here; prompts tokenize to one
    token per byte, padded by the pipeline to ``max_sequence_length``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    template = (resources.files("otherview") / "configs" / "chat_template.jinja").read_text()
    base = PreTrainedTokenizerFast(tokenizer_object=backend)
    base.add_special_tokens({"additional_special_tokens": specials})
    tok = Qwen2TokenizerFast(tokenizer_object=base._tokenizer, pad_token="<|endoftext|>",
                             eos_token="<|im_end|>", unk_token=None, model_max_length=model_max_length)
    tok.chat_template = template
    return tok


def build_builtin(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0,
                  park: dict[str, str] | None = None):
    """Return a ``Flux2KleinPipeline`` of built-in model ``name`` with seeded random weights.

    ``device="meta"`` builds the module tree without allocating (for checking names and shapes).
    ``park`` moves components to another device as soon as each is built (``{"transformer": "cpu"}``):
    the weights are drawn on ``device`` (the same random numbers as without ``park``) but never all
    held there at once.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = _builtin_dir(name)
    pipeline = import_pipeline(_read(folder / MARKER).get("pipeline", KLEIN_PIPELINE))
    device = torch.device(device)
    torch.manual_seed(seed)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of a 4B model first
    try:
        with torch.device(device):
            parked = lambda m, name: m.to((park or {}).get(name, device))  # noqa: E731
            transformer = parked(Flux2Transformer2DModel(**strip(_read(folder / "transformer.json"))), "transformer")
            vae = parked(AutoencoderKLFlux2(**strip(_read(folder / "vae.json"))), "vae")
            te_cfg = Qwen3Config(**{k: v for k, v in _read(folder / "text_encoder.json").items()
                                    if k not in ("model_type", "architectures")})
            text_encoder = parked(Qwen3ForCausalLM(te_cfg), "text_encoder")
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(**strip(_read(folder / "scheduler.json")))
    pipe = pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                    tokenizer=byte_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_builtin(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save built-in model ``name`` with ``save_pretrained`` into ``path``, marked as random weights."""
    path = Path(path)
    pipe = build_builtin(name, seed=seed)
    pipe.save_pretrained(path)
    meta = _read(_builtin_dir(name) / MARKER)
    meta.pop("variants", None)  # the released models' hub ids describe the configs, not this folder
    meta["random_weights"] = True
    meta["built_from"] = BUILTIN_PREFIX + name
    (path / MARKER).write_text(json.dumps(meta, indent=2))
    for weights in sorted(path.glob("*/*.safetensors")):  # provenance that survives losing the marker
        _add_weights_metadata(weights, {WEIGHTS_KEY: BUILTIN_PREFIX + name})
    return path


WEIGHTS_KEY = "otherview_random_weights"  # safetensors metadata of saved random weights: the built-in's name


def _add_weights_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add ``extra`` to a safetensors file's metadata in place, rewriting its header only (no tensor is loaded)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            while block := f.read(1 << 24):
                out.write(block)
    os.replace(tmp, path)


def _weights_random(folder: Path) -> bool:
    """Return whether any saved weights in a pipeline folder say they are otherview's random weights."""
    for weights in sorted(folder.glob("*/*.safetensors")):
        try:
            with open(weights, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 1 << 26:
                    continue
                if WEIGHTS_KEY in json.loads(f.read(n)).get("__metadata__", {}):
                    return True
        except (OSError, ValueError, AttributeError):
            continue  # unreadable weights are from_pretrained's to report
    return False


def load(source: str, dtype: str = "auto", device: str = "auto", placement: str = "resident") -> LoadedModel:
    """Return the pipeline of ``source`` on ``device``, built (built-in) or loaded (hub id / folder).

    ``placement`` (``memory.PLACEMENTS``) says which weights start on the GPU: all of them
    (``resident``), the text encoder only (``model-offload``: the prompts are encoded first), or none
    (``block-offload``: they stream in per block). Built-in weights are drawn on ``device`` either way,
    so a model is the same whatever its placement.
    """
    from . import memory, offload
    from .store import process_seconds

    started = process_seconds()
    arch = architecture(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    import_pipeline(arch.pipeline_class)  # diffusers, transformers and the model code: seconds of imports
    weights = process_seconds()  # from here on the weights are drawn or read
    memory.apply_process_cap(dev if dev.type == "cuda" else None)
    resident = placement == "resident" or dev.type != "cuda"
    on_cpu = {"transformer": "cpu", "vae": "cpu"} if placement == "model-offload" else \
        {"transformer": "cpu", "vae": "cpu", "text_encoder": "cpu"}
    if source.startswith(BUILTIN_PREFIX):
        log.info("building %s with random weights on %s (%s), placement %s", source, dev, dt, placement)
        pipe = build_builtin(source[len(BUILTIN_PREFIX):], dtype=dt, device=dev, park=None if resident else on_cpu)
    else:
        # An offloaded placement reads the weights into host memory; offload.place moves what belongs on the GPU.
        pipe = _from_pretrained(source, dt, dev if resident else None, arch.pipeline_class)
        pipe = pipe.to(dev) if resident else pipe
        pipe.set_progress_bar_config(disable=True)
    info = {"source": source, "random_weights": arch.random_weights, "dtype": str(dt).replace("torch.", ""),
            "device": str(dev), "parameters": {name: sum(p.numel() for p in m.parameters())
                                               for name, m in (("transformer", pipe.transformer),
                                                               ("text_encoder", pipe.text_encoder),
                                                               ("vae", pipe.vae))}}
    loaded = LoadedModel(pipe=pipe, arch=arch, device=dev, dtype=dt, info=info)
    offload.place(loaded, placement, "encode")
    # Seconds since the process started (imports included): the load began, its weights began, it ended.
    info["load_clock"] = {"started_s": round(started, 2), "weights_started_s": round(weights, 2),
                          "done_s": round(process_seconds(), 2)}
    return loaded


def import_pipeline(name: str):
    """Return the diffusers pipeline class ``name`` (``Flux2KleinPipeline``...), importing its code now.

    Importing it imports diffusers (with torch._dynamo), transformers' Qwen3 and the FLUX.2 models.
    """
    import diffusers

    return getattr(diffusers, name)


def _from_pretrained(source: str, dtype: torch.dtype, device: torch.device | None = None,
                     pipeline_class: str = KLEIN_PIPELINE):
    """Return the pipeline saved in ``source``, its weights read straight onto ``device`` where that is CUDA.

    ``device_map="cuda"`` makes diffusers and transformers read each safetensors file into device
    memory as it is loaded, instead of building the pipeline in host memory and copying all of it
    with ``.to(device)`` afterwards (a second pass over ~16 GB for Klein 4B). The device map is
    cleared afterwards: everything is on one device, so the pipeline's own ``.to`` stays usable.
    The KV variant needs ``Flux2KleinKVPipeline``: it installs the KV attention processors.
    """
    kwargs = {}
    if device is not None and device.type == "cuda" and device.index in (None, torch.cuda.current_device()):
        try:
            import accelerate  # noqa: F401  (diffusers' device_map needs it)

            kwargs["device_map"] = "cuda"
        except ImportError:
            log.info("accelerate is not installed: loading on the host, then moving to %s", device)
    try:
        pipe = import_pipeline(pipeline_class).from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(source).expanduser().is_dir():
            raise ModelUnavailable(f"could not load the pipeline in '{source}': {exc}") from None
        raise ModelUnavailable(_unavailable_message(source)) from None
    if kwargs:
        if any(hasattr(m, "_hf_hook") for m in pipe.components.values()):
            pipe.remove_all_hooks()
        pipe.hf_device_map = None  # one device: no dispatch hooks to keep, and .to() works again
    return pipe


def compile_transformer(loaded: LoadedModel, backend: str = "inductor") -> None:
    """Compile ``loaded``'s transformer in place: its repeated blocks (regional), see ``otherview.compiling``."""
    from .compiling import compile_blocks

    try:
        loaded.cache["compiled"] = (backend, compile_blocks(loaded.pipe.transformer, backend))
    except ValueError as exc:
        raise ModelSettingError(str(exc)) from None


def check_attention_backend(name: str) -> None:
    """Raise ``ModelSettingError`` unless ``name`` is "default" or a diffusers attention backend."""
    if name == "default":
        return  # nothing to look up: importing diffusers (and torch._dynamo with it) takes seconds
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName]
    if name not in known:
        raise ModelSettingError(f"runtime.attention_backend: unknown backend '{name}' (known: {', '.join(known)})")


def set_attention_backend(loaded: LoadedModel, name: str) -> None:
    """Select a diffusers attention backend by name ("default" leaves the model's own, SDPA)."""
    check_attention_backend(name)
    if name != "default":
        loaded.pipe.transformer.set_attention_backend(name)


@contextmanager
def only_needed_layers(text_encoder, last: int):
    """Run only the text encoder's layers up to the deepest hidden state the pipeline stacks.

    ``hidden_states[k]`` is the input of layer k, so layers past ``last`` change nothing that is used
    (Klein 4B stacks states 9, 18 and 27 of a 36-layer Qwen3: a quarter of its compute is skipped).
    The states used are bitwise those of the full model; the layer list is restored on exit.
    """
    model = getattr(text_encoder, "model", None)
    layers = getattr(model, "layers", None)
    if layers is None or last + 1 >= len(layers):
        yield
        return
    model.layers = torch.nn.ModuleList(list(layers)[: last + 1])
    try:
        yield
    finally:
        model.layers = layers
