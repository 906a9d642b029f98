"""What a model can capture: its projections by role, their streams, token counts and units.

``otherview sites --model M`` prints ``describe_sites``; the facts come from ``otherview.architectures``
(read from the model's configs, no weights).
"""

from __future__ import annotations

from typing import Any

from .architectures import ROLES, Architecture, ArchitectureError, TokenCounts, resolve_unit_width, unit_counts


def site_rows(arch: Architecture, unit_width: int | str = 16, text_tokens: int = 512,
              size: int | None = None) -> list[dict[str, Any]]:
    """Return one row per role of ``arch``: module pattern, stream, tokens seen, widths and unit counts.

    Parameters
    ----------
    arch : Architecture
    unit_width : int or "head"
        Channels per unit (``capture.unit_width``).
    text_tokens : int
        ``model.max_sequence_length``.
    size : int, optional
        Image side in pixels (default: the built-in model's own, else 1024).

    Returns
    -------
    rows : list of dict
        ``role, pattern, stream, stream_kind, sites, blocks, width, attention_width, heads_per_site,
        tokens, token_parts, attention_units, mlp_units, units`` (unit counts summed over the role's sites).
    """
    g = resolve_unit_width(unit_width, arch)
    side = size or arch.resolution or 1024
    if side % arch.token_multiple:
        raise ArchitectureError(f"image size {side} is not a multiple of {arch.token_multiple} on {arch.source}")
    n_image = (side // arch.token_multiple) ** 2
    counts = TokenCounts(text_tokens, n_image, n_image)
    rows = []
    for role in ROLES:
        sites = [c for c in arch.sites() if c.role == role]
        if not sites:
            continue
        first = sites[0]
        if first.width % g or first.attention_width % g:
            raise ArchitectureError(f"unit width {g} does not divide the {first.width} input channels of {first.name}")
        per = unit_counts(first, g)
        parts = arch.token_parts(role.kind)
        rows.append({"role": role.name, "pattern": role.pattern, "stream": role.stream, "stream_kind": role.kind,
                     "sites": len(sites), "blocks": f"{sites[0].block}..{sites[-1].block}", "width": first.width,
                     "attention_width": first.attention_width, "heads_per_site": first.heads,
                     "tokens": arch.site_tokens(role.kind, counts),
                     "token_parts": " + ".join(f"{p} {getattr(counts, p)}" for p in parts),
                     "attention_units": per["attention"] * len(sites), "mlp_units": per["mlp"] * len(sites),
                     "units": (per["attention"] + per["mlp"]) * len(sites)})
    return rows


def describe_sites(arch: Architecture, unit_width: int | str = 16, text_tokens: int = 512,
                   size: int | None = None) -> str:
    """Return the text ``otherview sites`` prints: the model in one line, then one block per role."""
    rows = site_rows(arch, unit_width, text_tokens, size)
    g = resolve_unit_width(unit_width, arch)
    side = size or arch.resolution or 1024
    lines = [f"{arch.source}" + (" (random weights)" if arch.random_weights else "") + f": {arch.summary()}",
             f"at {side}x{side}, {text_tokens} text tokens, units of {g} channels"
             + (" (head width)" if unit_width == "head" else "") + ":", ""]
    for r in rows:
        mlp = f" + MLP hidden {r['width'] - r['attention_width']}" if r["mlp_units"] else ""
        lines += [f"{r['role']}  ({r['stream']}-stream, {r['stream_kind']} stream; capture.sites = \"{r['role']}\" "
                  f"or \"{r['pattern']}\")",
                  f"  {r['sites']} sites (blocks {r['blocks']}), input {r['width']} channels = {r['heads_per_site']} "
                  f"heads x {arch.head_dim}{mlp}",
                  f"  tokens seen: {r['tokens']:,} ({r['token_parts']})",
                  f"  units: {r['units']:,} ({r['attention_units']:,} attention, {r['mlp_units']:,} MLP)", ""]
    total = sum(r["units"] for r in rows)
    lines.append(f"all sites: {total:,} units; the default capture.sites (image-stream attention-out and single out): "
                 f"{sum(r['units'] for r in rows if r['role'] != 'attention-out text'):,}")
    return "\n".join(lines)
