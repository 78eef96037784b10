"""`StepLatents`: a callable class for `ray.data.Dataset.map_batches` that adds
step latents to a Dataset of records, with the rules of `rjepa-latent extract`
(see docs/ray.md)."""
from __future__ import annotations

import hashlib
import json

import os
from typing import Any, Sequence

import numpy as np

from ..engine.model import Model, TOKEN_POOLING, resolve_poolings
from ..errors import InputError
from ..inputs.data import (DEFAULT_STEP_SEPARATOR, DEFAULT_TEMPLATE, ErrorRecord, FORMATS, ID_FIELDS, Record,
                           Template, read_rows)
from ..inputs.segment import DEFAULT_STEP_REGEX, Segmenter
from ..inputs.tokenize import Item, prepare_tokenizer, tokenize_records
from ..run.ray import placement


def latent_columns(layers: Sequence[int]) -> list[str]:
    """Column names of the latents, one per layer (absolute hidden-state index):
    `latents` for one layer, `latents_L<index>` for several."""
    return ["latents"] if len(layers) == 1 else [f"latents_L{k}" for k in layers]


def _plain(v: Any) -> Any:
    """A Ray batch value (NumPy arrays and scalars, nested) as plain Python."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def batch_rows(batch: Any) -> list[dict]:
    """The rows of a Ray Data batch: a pyarrow Table (`batch_format="pyarrow"`),
    a dict of NumPy arrays (Ray's default) or a pandas DataFrame."""
    if hasattr(batch, "to_pylist"):   # pyarrow.Table / RecordBatch
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):   # pandas
        return [{k: _plain(v) for k, v in row.items()} for row in batch.to_dict("records")]
    if isinstance(batch, dict):
        cols = {k: _plain(np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v)
                for k, v in batch.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        return [{k: c[i] for k, c in cols.items()} for i in range(n)]
    raise TypeError(f"StepLatents takes a Ray Data batch (dict of NumPy arrays, pyarrow.Table or "
                    f"pandas.DataFrame), got {type(batch).__name__}")


def content_id(row: dict) -> str:
    """A row's id from its content: "sha256:" + the first 16 hex digits of the
    sha256 of the row as canonical JSON (keys sorted, UTF-8; values JSON does
    not know are written as their str)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class StepLatents:
    """Step latents of the records of a Ray Data batch, as a pyarrow table.

        ds.map_batches(StepLatents, fn_constructor_kwargs={"model": PATH, "layers": [-2]},
                       concurrency=4, num_gpus=1)

    `model` is a checkpoint path (each actor loads its own Model once).
    `layers`, `pooling` (one span pooling: mean, first, last or max), `format`,
    `template`, `step_separator`, `step_regex`, `segment`, `strip_annotations`,
    `max_tokens` and `max_batch_tokens` mean what they mean for
    `extract_dataset`; `device` and `threads` default to what Ray assigned the
    actor (`placement`). Rows are records of the CLI's formats. Ray Data keeps
    no row order, so a position is no identity: a row's id is its
    `id_column` where one is given (e.g. `id_column="question_id"`), else its
    `id` (or `cot_id`) field, else one made from its content,
    `content_id(row)`: "sha256:" and the first 16 hex digits of the sha256 of
    the row as canonical JSON (keys sorted), the same for the same row in every
    run and on every worker (GSM8K has no id column; identical rows get one id,
    and the second of them in a batch is an error row: a duplicate id).

    Returns one row per input row: `id` (the input's id column as it is, so
    `CheckpointConfig(id_column="id")` matches it), `num_steps`, `num_tokens`
    (int32), `token_spans` (list<fixed_size_list<int32, 2>>: each step's
    [start, end) token range), one latents column per layer (`latent_columns`)
    as list<fixed_size_list<float32, hidden>> (one row per step), and `error`
    (null, or why the row could not be processed: then the other columns but
    `id` are null).
    """

    def __init__(self, model: str | os.PathLike, *, layers: Sequence[int] = (-2,),
                 pooling: str = "mean", format: str = "auto", template: str | None = None,
                 step_separator: str = DEFAULT_STEP_SEPARATOR, step_regex: str = DEFAULT_STEP_REGEX,
                 segment: str = "auto", strip_annotations: bool = False, max_tokens: int | None = None,
                 max_batch_tokens: int | None = None, device: str | None = None,
                 threads: int | None = None, id_column: str | None = None) -> None:
        if isinstance(model, Model):
            raise TypeError("StepLatents takes a checkpoint path, not a Model: a Model cannot be "
                            "pickled to Ray workers, so each actor loads its own")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a checkpoint path, got {type(model).__name__}")
        names, many = resolve_poolings(pooling)
        if many or names[0] == TOKEN_POOLING:
            raise ValueError(f"StepLatents takes one span pooling (mean, first, last or max), got "
                             f"{pooling!r}; for several, or every token, use rjepa_latent.ray.extract")
        if format not in FORMATS or format == "messages":
            raise ValueError(f"format must be one of {', '.join(f for f in FORMATS if f != 'messages')}, "
                             f"got {format!r} (chat templates are not supported by StepLatents)")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if id_column is not None and (not isinstance(id_column, str) or not id_column):
            raise ValueError(f"id_column must be a column name, got {id_column!r}")
        self._id_column = id_column
        self._format, self._pooling = format, names[0]
        self._template = Template(template if template is not None else DEFAULT_TEMPLATE, step_separator)
        self._step_regex = step_regex
        self._segmenter = Segmenter(segment, step_regex)
        self._strip = bool(strip_annotations)
        device, threads = placement(device, threads)
        self._m = Model(model, device=device, max_batch_tokens=max_batch_tokens, threads=threads)
        self._layers = self._m.resolve_layers(layers)
        self._tok = prepare_tokenizer(self._m.tokenizer)
        self._max_tokens = max_tokens if max_tokens is not None else \
            self._m.config.get("max_position_embeddings")
        self.columns = latent_columns(self._layers)

    def __call__(self, batch: Any):
        import pyarrow as pa
        rows = batch_rows(batch)
        ids = self._ids(batch, rows)
        rows = [self._with_id(row) for row in rows]
        results: list[Any] = [None] * len(rows)   # Item with its latents, or an error reason
        good = self._records(rows, results)
        done = tokenize_records(self._tok, [r for _, r in good], self._max_tokens)
        todo = []
        for (i, _), t in zip(good, done):
            if isinstance(t, ErrorRecord):
                results[i] = t.reason
                continue
            try:
                self._m.check(t.ids, t.spans)
            except InputError as e:
                results[i] = f"the engine cannot take this record's tokens: {e}"
                continue
            todo.append((i, t))
        if todo:
            lats = self._m.extract([t.ids for _, t in todo], [t.spans for _, t in todo],
                                   layers=self._layers, pooling=self._pooling)
            for (i, t), lat in zip(todo, lats):
                results[i] = (t, lat)
        return self._table(pa, ids, results)

    def _ids(self, batch: Any, rows: list[dict]):
        """The output's id column: the input's `id` column unchanged where it has
        one, else each record's id field as a string."""
        import pyarrow as pa
        if self._id_column is not None:
            return pa.array([None if row.get(self._id_column) is None else str(row[self._id_column])
                             for row in rows], pa.string())
        if not all(any(row.get(f) is not None for f in ID_FIELDS) for row in rows):
            return pa.array([str(self._id_of(row)) for row in rows], pa.string())
        if hasattr(batch, "column_names") and "id" in batch.column_names:
            col = batch.column("id")
            return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if isinstance(batch, dict) and "id" in batch:
            col = pa.array(_plain(np.asarray(batch["id"])))
            # an empty (or all-null) column has pyarrow's null type: string, as
            # the other batches' ids, so Ray Data can concatenate the blocks
            return col.cast(pa.string()) if pa.types.is_null(col.type) else col
        out = []
        for row in rows:
            rid = next((row[f] for f in ID_FIELDS if row.get(f) is not None), None)
            out.append(None if rid is None else str(rid))
        return pa.array(out, pa.string())

    def _id_of(self, row: dict) -> Any:
        """The row's id (see the class docstring); None: its id_column is empty."""
        if self._id_column is not None:
            return row.get(self._id_column)
        found = next((row[f] for f in ID_FIELDS if row.get(f) is not None), None)
        return found if found is not None else content_id(row)

    def _with_id(self, row: dict) -> dict:
        """The row as the record reader takes it: its id in the `id` field."""
        rid = self._id_of(row)
        if rid is None:   # an empty id_column: no id at all (the row becomes an error)
            return {k: v for k, v in row.items() if k not in ID_FIELDS}
        if self._id_column is None and row.get("id") is not None:
            return row
        return {**{k: v for k, v in row.items() if k not in ID_FIELDS}, "id": str(rid)}

    def _records(self, rows: list[dict], results: list) -> list[tuple[int, Record]]:
        """(row position, Record) of the rows that are good records; the reasons of
        the others go into `results`. Each row is judged by `data.read_rows`, the
        rules of `rjepa-latent extract`."""
        todo, where = [], []
        for i, row in enumerate(rows):
            if not any(row.get(f) is not None for f in ID_FIELDS):   # only an empty id_column
                results[i] = (f"the row's id column {self._id_column!r} is empty: Ray Data keeps no "
                              "row order, so each row needs its own id")
                continue
            todo.append(row)
            where.append(i)
        if not todo:
            return []
        recs = list(read_rows(todo, self._format, self._template, self._step_regex,
                              segment=self._segmenter, strip_annotations=self._strip,
                              source="batch"))
        good = []
        for r in recs:   # one per line, in order (no line of ours is blank)
            i = where[r.line - 1]
            if isinstance(r, ErrorRecord):
                results[i] = r.reason
            else:
                good.append((i, r))
        return good

    def _table(self, pa, ids, results: list):
        hidden = self._m.hidden_size
        n = len(results)
        ok = [isinstance(r, tuple) for r in results]
        mask = pa.array([not x for x in ok], pa.bool_())
        items: list[Item | None] = [r[0] if isinstance(r, tuple) else None for r in results]
        steps = [len(it.spans) if it is not None else 0 for it in items]
        offsets = pa.array(np.concatenate([[0], np.cumsum(steps)]).astype(np.int32), pa.int32())
        spans = np.concatenate([it.spans for it in items if it is not None] or
                               [np.zeros((0, 2), np.int32)]).astype(np.int32)
        cols = {
            "id": ids,
            "num_steps": pa.array([s if o else None for s, o in zip(steps, ok)], pa.int32()),
            "num_tokens": pa.array([len(it.ids) if it is not None else None for it in items], pa.int32()),
            "token_spans": pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(pa.array(spans.reshape(-1)), 2), mask=mask),
        }
        for j, name in enumerate(self.columns):
            flat = np.concatenate([r[1][j].reshape(-1) for r in results if isinstance(r, tuple)] or
                                  [np.zeros(0, np.float32)]).astype(np.float32, copy=False)
            cols[name] = pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat), hidden), mask=mask)
        cols["error"] = pa.array([None if o else r for r, o in zip(results, ok)], pa.string())
        assert all(len(c) == n for c in cols.values())
        return pa.table(cols)
