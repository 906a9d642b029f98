"""Model sources: the real ``Flux2KleinPipeline.from_pretrained`` path and built-in random-weight models.

A source is a hub id, a local folder saved with ``save_pretrained``, or ``builtin:NAME`` for a
random-weight model built from configs shipped in ``otherview/configs/NAME`` (``tiny`` runs a full
spec on a CPU in seconds; ``klein-4b`` is the full FLUX.2 Klein 4B architecture, for GPU
benchmarks). Nothing is downloaded: this module reads configs without allocating weights (for
``otherview plan``) and builds or loads the pipeline (for ``otherview exec``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MARKER = "otherview.json"  # written beside a saved built-in pipeline: it carries random weights


class ModelUnavailable(Exception):
    """The model cannot be found or loaded here; the message names the fix."""


class ModelSettingError(ValueError):
    """A spec's runtime setting does not fit the model (e.g. an unknown attention backend)."""


@dataclass(frozen=True)
class Architecture:
    """What a plan needs to know of a model, read from configs without building weights."""

    source: str
    transformer: dict[str, Any]
    text_encoder_out_layers: tuple[int, ...]
    random_weights: bool
    resolution: int | None = None  # a built-in small model runs at this size, whatever the spec asks
    vae_scale_factor: int = 8
    description: str = ""

    @property
    def head_dim(self) -> int:
        return int(self.transformer["attention_head_dim"])

    @property
    def n_heads(self) -> int:
        return int(self.transformer["num_attention_heads"])

    @property
    def inner_dim(self) -> int:
        return self.head_dim * self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.inner_dim * float(self.transformer.get("mlp_ratio", 3.0)))

    @property
    def n_double(self) -> int:
        return int(self.transformer["num_layers"])

    @property
    def n_single(self) -> int:
        return int(self.transformer["num_single_layers"])


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


def _vae_scale(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [128, 256, 512, 512])) - 1)


def _known_hub_architecture(source: str) -> str | None:
    for name in builtin_names():
        if source in _read(_builtin_dir(name) / MARKER).get("hub_ids", []):
            return name
    return None


def architecture(source: str) -> Architecture:
    """Return the architecture of ``source`` from its configs alone (no weights are allocated)."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        folder = _builtin_dir(name)
        meta = _read(folder / MARKER)
        return Architecture(
            source=source,
            transformer=_read(folder / "transformer.json"),
            text_encoder_out_layers=tuple(meta["text_encoder_out_layers"]),
            random_weights=True,
            resolution=meta.get("resolution"),
            vae_scale_factor=_vae_scale(_read(folder / "vae.json")),
            description=meta.get("description", ""),
        )
    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            transformer = _read(folder / "transformer" / "config.json")
        except FileNotFoundError:
            raise ModelUnavailable(f"'{source}' is a folder but holds no transformer/config.json: is it a "
                                   "pipeline saved with save_pretrained?") from None
        vae = _read(folder / "vae" / "config.json") if (folder / "vae" / "config.json").exists() else {}
        meta = _read(folder / MARKER) if (folder / MARKER).exists() else {}
        return Architecture(
            source=str(folder),
            transformer=transformer,
            text_encoder_out_layers=tuple(meta.get("text_encoder_out_layers") or _default_out_layers(folder)),
            random_weights=bool(meta.get("random_weights", False)),
            resolution=meta.get("resolution"),
            vae_scale_factor=_vae_scale(vae),
        )
    known = _known_hub_architecture(source)
    cached = _hub_cached_config(source)
    if cached is not None:
        return Architecture(source=source, transformer=cached, text_encoder_out_layers=(9, 18, 27),
                            random_weights=False)
    if known is not None:
        arch = architecture(BUILTIN_PREFIX + known)
        return Architecture(source=source, transformer=arch.transformer,
                            text_encoder_out_layers=arch.text_encoder_out_layers, random_weights=False,
                            vae_scale_factor=arch.vae_scale_factor)
    raise ModelUnavailable(_unavailable_message(source))


def _default_out_layers(folder: Path) -> tuple[int, ...]:
    te = folder / "text_encoder" / "config.json"
    tr = _read(folder / "transformer" / "config.json")
    if not te.exists():
        return (9, 18, 27)
    cfg = _read(te)
    n = int(tr["joint_attention_dim"]) // int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    if n == 3 and layers >= 28:
        return (9, 18, 27)
    # Evenly spaced hidden states, the last one the final layer's.
    return tuple(round(layers * (i + 1) / n) for i in range(n))


def _hub_cached_config(repo_id: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "transformer/config.json", local_files_only=True)
    except Exception:  # not in the local cache (or not a valid id): the caller explains
        return None
    return _read(Path(path))


def _unavailable_message(source: str) -> str:
    return (f"the weights of '{source}' are not on this machine and cannot be downloaded here; "
            "use --model builtin:klein-4b (random weights, same architecture), --model builtin:tiny, "
            "or --model /path/to/a/local/pipeline/folder")


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


def build_builtin(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """Return a ``Flux2KleinPipeline`` of built-in model ``name`` with seeded random weights."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = _builtin_dir(name)
    device = torch.device(device)
    torch.manual_seed(seed)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of a 4B model first
    try:
        with torch.device(device):
            transformer = Flux2Transformer2DModel(**strip(_read(folder / "transformer.json")))
            vae = AutoencoderKLFlux2(**strip(_read(folder / "vae.json")))
            te_cfg = Qwen3Config(**{k: v for k, v in _read(folder / "text_encoder.json").items()
                                    if k not in ("model_type", "architectures")})
            text_encoder = Qwen3ForCausalLM(te_cfg)
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(**strip(_read(folder / "scheduler.json")))
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=byte_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_builtin(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save built-in model ``name`` with ``save_pretrained`` into ``path``, marked as random weights."""
    path = Path(path)
    pipe = build_builtin(name, seed=seed)
    pipe.save_pretrained(path)
    meta = _read(_builtin_dir(name) / MARKER)
    meta["random_weights"] = True
    meta["built_from"] = BUILTIN_PREFIX + name
    (path / MARKER).write_text(json.dumps(meta, indent=2))
    return path


def load(source: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Return the pipeline of ``source`` on ``device``, built (built-in) or loaded (hub id / folder)."""
    arch = architecture(source)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source.startswith(BUILTIN_PREFIX):
        log.info("building %s with random weights on %s (%s)", source, dev, dt)
        pipe = build_builtin(source[len(BUILTIN_PREFIX):], dtype=dt, device=dev)
    else:
        pipe = _from_pretrained(source, dt, dev).to(dev)
        pipe.set_progress_bar_config(disable=True)
    info = {"source": source, "random_weights": arch.random_weights, "dtype": str(dt).replace("torch.", ""),
            "device": str(dev), "parameters": {name: sum(p.numel() for p in m.parameters())
                                               for name, m in (("transformer", pipe.transformer),
                                                               ("text_encoder", pipe.text_encoder),
                                                               ("vae", pipe.vae))}}
    return LoadedModel(pipe=pipe, arch=arch, device=dev, dtype=dt, info=info)


def _from_pretrained(source: str, dtype: torch.dtype, device: torch.device | None = None):
    """Return the pipeline saved in ``source``, its weights read straight onto ``device`` where that is CUDA.

    ``device_map="cuda"`` makes diffusers and transformers read each safetensors file into device
    memory as it is loaded, instead of building the pipeline in host memory and copying all of it
    with ``.to(device)`` afterwards (a second pass over ~16 GB for Klein 4B). The device map is
    cleared afterwards: everything is on one device, so the pipeline's own ``.to`` stays usable.
    """
    from diffusers import Flux2KleinPipeline

    kwargs = {}
    if device is not None and device.type == "cuda" and device.index in (None, torch.cuda.current_device()):
        try:
            import accelerate  # noqa: F401  (diffusers' device_map needs it)

            kwargs["device_map"] = "cuda"
        except ImportError:
            log.info("accelerate is not installed: loading on the host, then moving to %s", device)
    try:
        pipe = Flux2KleinPipeline.from_pretrained(source, dtype=dtype, **kwargs)
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
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName]
    if name != "default" and name not in known:
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
