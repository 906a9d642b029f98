"""A run directory as data: ``load_run(path)`` gives a ``Run`` with labelled tables and arrays.

Every array of the run comes back labelled: per-pass values by pass (condition, item, scene, seed,
wording, step, from ``passes.csv``), per-item contrast values by item, per-unit statistics by unit
(from ``units.csv`` and the safetensors files), and the nulls with their bin edges. The manifest and
the summary come back as typed records (``otherview.records``). Nothing here needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .records import ManifestRecord, RunFormatError, SummaryRecord, read_manifest, read_summary

if TYPE_CHECKING:
    import pandas as pd

#: Columns of ``units.csv`` that say where a unit sits (the rest are one analysis's statistics).
LAYOUT_COLUMNS = ("unit", "site", "stream", "stream_kind", "block", "channel_start", "channel_end", "kind", "head",
                  "subgroup")
#: Columns of ``passes.csv`` that label a row of the per-pass arrays.
PASS_LABELS = ("pass", "condition", "item", "item_value", "scene", "seed", "wording", "step")


UNIT_TEXT_COLUMNS = ("analysis", "contrast", "step", "site", "stream", "stream_kind", "kind")
PASS_TEXT_COLUMNS = ("condition", "item_value", "scene", "step", "prompt")


def _read_csv(path: Path, text: tuple[str, ...], optional_int: tuple[str, ...]) -> "pd.DataFrame":
    """Return a run's CSV with text columns as written (a condition may be called "NA"), numbers as numbers
    (``nan`` and ``inf`` included) and an empty cell of ``optional_int`` as missing (nullable Int64)."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in table.columns:
        if column in optional_int:
            table[column] = pd.to_numeric(table[column].replace("", None)).astype("Int64")
        elif column not in text:
            try:
                table[column] = pd.to_numeric(table[column])
            except ValueError:  # "nan" (and "inf" in some pandas versions): Python's float reads them
                table[column] = table[column].astype("float64")
    return table


@dataclass(frozen=True)
class Null:
    """One analysis's sign-flip null, as stored in ``null.safetensors``, with its bin edges.

    Attributes
    ----------
    method : str
        ``"exact"`` (all 2^(N-1) flips) or ``"random"``.
    n_flips : int
        Flips in the null, the observed labelling included.
    thresholds : ndarray, shape (n_thresholds,)
        The |t| thresholds of ``count_hist``'s rows.
    count_hist : ndarray, int64, shape (n_thresholds, n_units + 1)
        ``count_hist[k, j]``: flips in which exactly ``j`` units have |t| > ``thresholds[k]``.
    exceed : ndarray, int64, shape (n_units,)
        Flips whose |t_u| reaches the observed |t_u| (p uncorrected = exceed / n_flips).
    fwer_exceed : ndarray, int64, shape (n_units,)
        Flips whose max over units of |t| reaches the observed |t_u| (p FWER = fwer_exceed / n_flips).
    max_hist : ndarray, int64, shape (n_bins,)
        Histogram over flips of the max over units of |t|, binned in r = |t| / sqrt(N - 1 + t^2).
    max_hist_edges : ndarray, float64, shape (n_bins + 1,)
        The bins' edges in |t|: bin ``b`` holds ``max_hist_edges[b] <= max|t| < max_hist_edges[b + 1]``;
        the last edge is inf (r = 1).
    """

    method: str
    n_flips: int
    thresholds: np.ndarray
    count_hist: np.ndarray
    exceed: np.ndarray
    fwer_exceed: np.ndarray
    max_hist: np.ndarray
    max_hist_edges: np.ndarray


def max_hist_edges(n_bins: int, n_items: int) -> np.ndarray:
    """Return the |t| edges of a max-|t| histogram of ``n_bins`` bins over ``n_items`` items.

    The op bins r = |t| / sqrt(N - 1 + t^2) uniformly on [0, 1] (bin ``floor(r * n_bins)``); an
    edge r maps back to |t| = r sqrt((N - 1) / (1 - r^2)), so the last edge (r = 1) is inf.

    Returns
    -------
    edges : ndarray, float64, shape (n_bins + 1,)
    """
    r = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    with np.errstate(divide="ignore"):
        return r * np.sqrt(max(n_items - 1, 0) / np.maximum(1.0 - r * r, 0.0))


class Run:
    """A finished run directory, loaded: its records, tables and arrays, labelled.

    Use ``otherview.load_run(path)``. Tables are pandas DataFrames, read on first use.

    Attributes
    ----------
    path : Path
        The run directory.
    manifest : ManifestRecord
        What produced the run (``manifest.json``).
    summary : SummaryRecord
        The results as data (``summary.json``), what the report renders.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunFormatError(self.path, [("", "no such run directory")])
        self.manifest: ManifestRecord = read_manifest(self.path)
        if self.manifest.status != "complete":
            raise RunFormatError(self.path, [("manifest.json: status", f"'{self.manifest.status}': the run did not "
                                              "complete" + (f" ({self.manifest.error})" if self.manifest.error else ""))])
        self.summary: SummaryRecord = read_summary(self.path)

    # --- names ------------------------------------------------------------------------------------
    @property
    def analyses(self) -> list[str]:
        """Return the analysis keys: a contrast name, or ``<contrast>.step<k>`` per captured step."""
        return [a.key for a in self.summary.analyses]

    @property
    def contrasts(self) -> list[str]:
        """Return the contrast names (specificity differences included)."""
        return [c.name for c in self.summary.design.contrasts]

    @property
    def layout_id(self) -> str:
        """Return the layout id: equal for two runs exactly when their units match index by index."""
        return self.summary.layout.id

    def _key(self, analysis: str | None) -> str:
        if analysis is None:
            return self.analyses[0]
        if analysis not in self.analyses:
            raise KeyError(f"no analysis '{analysis}' in {self.path} (analyses: {', '.join(self.analyses)})")
        return analysis

    # --- tables -----------------------------------------------------------------------------------
    @cached_property
    def units(self) -> "pd.DataFrame":
        """Return ``units.csv``: one row per analysis and unit (long form; see the README's column dictionary)."""
        return _read_csv(self.path / "units.csv", text=UNIT_TEXT_COLUMNS, optional_int=("head",))

    @cached_property
    def layout(self) -> "pd.DataFrame":
        """Return where every unit sits, indexed by unit: site, stream, stream_kind, block, channels, kind, head."""
        first = self.units[self.units["analysis"] == self.analyses[0]]
        return first[list(LAYOUT_COLUMNS)].set_index("unit")

    def unit_table(self, analysis: str | None = None) -> "pd.DataFrame":
        """Return one analysis's units: where each sits and its statistics, indexed by unit (n_units rows)."""
        key = self._key(analysis)
        table = self.units[self.units["analysis"] == key]
        return table.drop(columns=["analysis", "contrast", "step"]).set_index("unit")

    @cached_property
    def passes(self) -> "pd.DataFrame":
        """Return ``passes.csv``, indexed by row of the per-pass arrays: each row's pass, condition, item, factors."""
        return _read_csv(self.path / "passes.csv", text=PASS_TEXT_COLUMNS, optional_int=("tokens",)).set_index("row")

    def top(self, analysis: str | None = None, n: int = 10, kind: str | None = None, by: str = "t") -> "pd.DataFrame":
        """Return the ``n`` units of ``analysis`` with the largest ``|by|`` (``kind``: "attention" or "mlp" only).

        Returns
        -------
        table : DataFrame, shape (<= n, n_columns)
            Rows of ``unit_table(analysis)``, strongest first, indexed by unit.
        """
        table = self.unit_table(analysis)
        if kind is not None:
            if kind not in ("attention", "mlp"):
                raise ValueError(f"kind should be 'attention' or 'mlp', got {kind!r}")
            table = table[table["kind"] == kind]
        order = np.argsort(-np.abs(table[by].to_numpy(dtype=np.float64)), kind="stable")[:n]
        return table.iloc[order]

    # --- arrays -----------------------------------------------------------------------------------
    @cached_property
    def _rms(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path / "rms.safetensors"))

    @cached_property
    def _nulls(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path / "null.safetensors"))

    @cached_property
    def _inference(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path / "inference.safetensors"))

    def _columns(self, units: Iterable[int] | None) -> np.ndarray:
        n = self.summary.n_units
        if units is None:
            return np.arange(n)
        idx = np.asarray(list(units), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"units must be in [0, {n}); got {idx.min()}..{idx.max()}")
        return idx

    def values(self, units: Iterable[int] | None = None) -> "pd.DataFrame":
        """Return the per-pass values (each unit's RMS over its counted tokens), labelled by pass.

        Parameters
        ----------
        units : iterable of int, optional
            Unit indices (columns) to return; default all.

        Returns
        -------
        values : DataFrame, shape (n_passes x n_step_levels, n_selected_units)
            Index: a MultiIndex of ``pass, condition, item, item_value, scene, seed, wording, step``
            (one level per column of ``passes.csv``); columns: unit indices.
        """
        import pandas as pd

        cols = self._columns(units)
        rms = self._rms["rms"]
        labels = self.passes[list(PASS_LABELS)]
        index = pd.MultiIndex.from_frame(labels)
        return pd.DataFrame(rms[:, cols], index=index, columns=pd.Index(cols, name="unit"))

    def item_values(self, analysis: str | None = None, units: Iterable[int] | None = None) -> "pd.DataFrame":
        """Return the contrast's value per item and unit (the d the statistics test), labelled by item.

        Returns
        -------
        d : DataFrame, shape (n_items, n_selected_units)
            Index: the items' filler values (``item``); columns: unit indices. d = the contrast's weighted
            sum of condition values, averaged over scenes, seeds and wordings.
        """
        import pandas as pd

        key = self._key(analysis)
        cols = self._columns(units)
        d = self._rms[f"{key}/d"]
        items = pd.Index(self.summary.analysis(key).axis.fillers, name="item")
        return pd.DataFrame(d[:, cols], index=items, columns=pd.Index(cols, name="unit"))

    def stats(self, analysis: str | None = None) -> dict[str, np.ndarray]:
        """Return every per-unit statistic of ``analysis`` as arrays of shape (n_units,).

        Keys: ``t``, ``mean_d``, ``d_z``, ``d_z_low``, ``d_z_high``, ``p_uncorrected``, ``p_fwer``, ``q``,
        ``axis_rho``, ``axis_p``, ``axis_p_fwer``, ``axis_q``; and ``axis_max_null`` (shape
        (n_permutations,), the max |rho| of each permutation).
        """
        key = self._key(analysis)
        out = {"t": self._rms[f"{key}/t"], "mean_d": self._rms[f"{key}/d"].mean(axis=0)}
        out.update({name[len(key) + 1:]: v for name, v in self._inference.items() if name.startswith(f"{key}/")})
        if "p_uncorrected" not in out:  # runs written before the p-values were stored beside the others
            null = self.null(key)
            out["p_uncorrected"] = null.exceed / null.n_flips
            out["p_fwer"] = null.fwer_exceed / null.n_flips
        return out

    def null(self, analysis: str | None = None) -> Null:
        """Return the sign-flip null of ``analysis``, with the max-|t| histogram's bin edges in |t|."""
        key = self._key(analysis)
        rec = self.summary.analysis(key).null
        a = {name: self._nulls[f"{key}/{name}"] for name in ("count_hist", "exceed", "fwer_exceed", "max_hist")}
        edges = self._nulls.get(f"{key}/max_hist_edges")
        if edges is None:
            edges = max_hist_edges(a["max_hist"].shape[0], self.summary.n_items)
        return Null(method=rec.method, n_flips=rec.flips, thresholds=np.asarray(rec.thresholds, dtype=np.float64),
                    max_hist_edges=edges, **a)

    def passed(self, specificity: str) -> np.ndarray:
        """Return the specificity test's per-unit verdict, bool array of shape (n_units,)."""
        keys = [s.key for s in self.summary.specificity]
        if specificity not in keys:
            raise KeyError(f"no specificity test '{specificity}' (tests: {', '.join(keys) or 'none'})")
        return self._rms[f"{specificity}/passed"].astype(bool)

    # --- display ----------------------------------------------------------------------------------
    def _lines(self) -> list[str]:
        s, m = self.summary, self.manifest
        weights = " (RANDOM WEIGHTS)" if m.random_weights else ""
        lines = [f"Run {s.experiment} at {self.path}", f"  model {m.model.get('source')}{weights}; layout {s.layout.id} "
                 f"({s.n_units:,} units of {s.layout.unit_width} channels, {len(s.layout.sites)} sites)",
                 f"  {s.design.passes:,} passes: {len(s.design.conditions)} conditions x {s.n_items} items x "
                 f"{_n(len(s.design.scenes), 'scene')} x {_n(len(s.design.seeds), 'seed')} x "
                 f"{_n(s.design.wordings, 'wording')}"]
        for a in s.analyses:
            total = a.groups.all[0]
            lines.append(f"  analysis {a.key} ({a.label}): {total.fwer:,} units at FWER p <= {s.alpha:g}, "
                         f"max |t| {total.max_abs_t:.2f}")
        for t in s.specificity:
            lines.append(f"  specificity {t.key}: {t.passed:,} units pass")
        return lines

    def __repr__(self) -> str:
        return "\n".join(self._lines())

    def _repr_html_(self) -> str:
        import html

        head, *rest = self._lines()
        items = "".join(f"<li>{html.escape(line.strip())}</li>" for line in rest)
        return f"<b>{html.escape(head)}</b><ul>{items}</ul>"


def _n(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def load_run(path: str | Path) -> Run:
    """Return the completed run at ``path`` (a run directory), its JSON checked against the typed records.

    Raise ``RunFormatError`` naming what is missing or malformed.
    """
    return Run(path)


def as_dict(obj: Any) -> Any:
    """Return a record (or anything holding records) as plain JSON-ready data."""
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
