"""Placement on the device: where a loaded pipeline's weights live in each phase (``memory.PLACEMENTS``).

``memory`` decides the placement from the budget; this module applies it to a loaded model: moving
whole models between the CPU and the GPU (model-offload), installing diffusers' group offloading
(block-offload), and running the text encoder without its vocabulary logits.
"""

from __future__ import annotations

import torch


def _move(module, device) -> None:
    if module is not None and next(module.parameters()).device != torch.device(device):
        module.to(device)


def place(loaded, est_or_placement, stage: str) -> None:
    """Put ``loaded``'s weights where ``stage`` ("encode" or "denoise") needs them under the placement.

    Idempotent, so a model reused across runs is moved only when it must be. ``block-offload``
    installs diffusers' group offloading once (the weights then live on the CPU and stream in).
    """
    placement = getattr(est_or_placement, "placement", est_or_placement)
    pipe, dev = loaded.pipe, loaded.device
    loaded.info["placement"] = placement
    if dev.type != "cuda" and placement != "block-offload":
        return
    if placement == "resident":
        for m in (pipe.text_encoder, pipe.transformer, pipe.vae):
            _move(m, dev)
    elif placement == "model-offload":
        out, into = ((pipe.transformer, pipe.vae), (pipe.text_encoder,)) if stage == "encode" else \
            ((pipe.text_encoder,), (pipe.transformer, pipe.vae))
        for m in out:
            _move(m, "cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for m in into:
            _move(m, dev)
    elif not loaded.cache.get("block_offload"):
        from diffusers.hooks import apply_group_offloading

        for m in (pipe.text_encoder, pipe.transformer):
            _move(m, "cpu")
            apply_group_offloading(m, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=dev.type == "cuda")
        _move(pipe.vae, dev)
        loaded.cache["block_offload"] = True


class without_logits:
    """Context manager: the text encoder's LM head returns its input instead of vocabulary logits.

    The pipeline reads only ``hidden_states`` of ``Qwen3ForCausalLM``; its logits (prompts x tokens x
    151,936 values: 4.6 GiB for 32 prompts of 512 tokens) are computed and thrown away. The hidden
    states are bitwise the same.
    """

    def __init__(self, text_encoder):
        self.te = text_encoder
        self.head = getattr(text_encoder, "lm_head", None)

    def __enter__(self):
        if self.head is not None:
            self.te.lm_head = torch.nn.Identity()
        return self

    def __exit__(self, *exc):
        if self.head is not None:
            self.te.lm_head = self.head
        return False
