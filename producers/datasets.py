"""Datasets a backfill reads rows from, and the result files it writes in input order.

| input | rows | output |
|---|---|---|
| `.npy` | the array's first dimension, one input (`--input-name`) | `.npz` |
| `.npz` | each array is an input of that name; all share the first dimension | `.npz` |
| `.jsonl` | one JSON object per line: input name → (nested) list of numbers | `.jsonl` |
| `.parquet` | one column per input (lists of numbers); needs pyarrow | `.parquet` |

An `.npz` output holds each output stacked over the rows (NaN, or 0 for integers, where a row
failed), and per row its `status`, `error_code`, `error_message` and `version` (-1: none).
A `.jsonl` output has one object per row: `row`, `id`, `status`, `version`, `outputs` (name →
nested list) and `error` (`code`, `message`) or null. Parquet has the same columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from schemas.messages import InferenceResult

Row = dict[str, NDArray[Any]]
"""One row's inputs by name, each with a leading batch dimension of 1."""


class Dataset(Protocol):
    """Rows read by index, each a request's inputs."""

    @property
    def rows(self) -> int:
        """How many rows there are."""
        ...

    def row(self, index: int) -> Row:
        """The inputs of row ``index``."""
        ...


@dataclass(frozen=True, slots=True)
class ArrayDataset:
    """`.npy` (one input) or `.npz` (named inputs): rows along the first dimension."""

    arrays: Mapping[str, NDArray[Any]]
    rows: int

    def row(self, index: int) -> Row:
        return {name: np.ascontiguousarray(array[index : index + 1])
                for name, array in self.arrays.items()}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RowListDataset:
    """`.jsonl` or `.parquet`: each row's inputs held as lists, made arrays when asked for."""

    records: Sequence[Mapping[str, Any]]
    dtype: np.dtype[Any]

    @property
    def rows(self) -> int:
        return len(self.records)

    def row(self, index: int) -> Row:
        return {name: np.asarray(value, dtype=self.dtype)[np.newaxis]
                for name, value in self.records[index].items()}  # fmt: skip


def open_dataset(path: Path, *, input_name: str = "input", dtype: str = "float32") -> Dataset:
    """The dataset at ``path``, by its suffix (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        return ArrayDataset(arrays={input_name: array}, rows=int(array.shape[0]))
    if suffix == ".npz":
        archive = np.load(path)
        arrays = {name: archive[name] for name in archive.files}
        lengths = {int(array.shape[0]) for array in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: inputs disagree on the number of rows: {sorted(lengths)}")
        return ArrayDataset(arrays=arrays, rows=lengths.pop())
    if suffix == ".jsonl":
        with path.open() as file:
            records = [json.loads(line) for line in file if line.strip()]
        if not all(isinstance(record, dict) for record in records):
            raise ValueError(f"{path}: every line must be an object of input name to values")
        return RowListDataset(records=records, dtype=np.dtype(dtype))
    if suffix == ".parquet":
        table = _pyarrow_parquet().read_table(path)
        return RowListDataset(records=table.to_pylist(), dtype=np.dtype(dtype))
    raise ValueError(f"{path}: unknown dataset type {suffix!r} (.npy, .npz, .jsonl, .parquet)")


def output_suffix(input_path: Path) -> str:
    """The output format family of an input: `.npz` for arrays, else the input's own."""
    suffix = input_path.suffix.lower()
    return ".npz" if suffix in (".npy", ".npz") else suffix


def write_results(
    path: Path, results: Sequence[InferenceResult], ids: Sequence[str] | None = None
) -> None:
    """Write ``results`` (in row order) to ``path`` in the format its suffix names."""
    suffix = path.suffix.lower()
    partial = path.with_name(f".{path.name}.partial")
    if suffix == ".npz":
        with partial.open("wb") as file:
            np.savez(file, **_columns(results))  # type: ignore[arg-type]
    elif suffix == ".jsonl":
        with partial.open("w") as file:
            for row, result in enumerate(results):
                file.write(json.dumps(_record(row, result)) + "\n")
    elif suffix == ".parquet":
        pyarrow = __import__("pyarrow")
        table = pyarrow.Table.from_pylist([_record(row, r) for row, r in enumerate(results)])
        _pyarrow_parquet().write_table(table, partial)
    else:
        raise ValueError(f"{path}: unknown output type {suffix!r}")
    partial.replace(path)


def _record(row: int, result: InferenceResult) -> dict[str, Any]:
    return {
        "row": row,
        "id": result.id,
        "status": result.status.value,
        "version": result.version,
        "outputs": {t.name: t.to_numpy().tolist() for t in result.outputs},
        "error": None if result.error is None
        else {"code": result.error.code.value, "message": result.error.message},
    }  # fmt: skip


def _columns(results: Sequence[InferenceResult]) -> dict[str, NDArray[Any]]:
    template = next((r for r in results if r.outputs), None)
    columns: dict[str, NDArray[Any]] = {
        "status": np.array([r.status.value for r in results]),
        "error_code": np.array([r.error.code.value if r.error else "" for r in results]),
        "error_message": np.array([r.error.message if r.error else "" for r in results]),
        "version": np.array([r.version if r.version is not None else -1 for r in results]),
    }
    if template is None:
        return columns
    for tensor in template.outputs:
        first = tensor.to_numpy()
        filler = np.nan if np.issubdtype(first.dtype, np.floating) else 0
        stacked = np.full((len(results), *first.shape[1:]), filler, dtype=first.dtype)
        for row, result in enumerate(results):
            if not result.outputs:
                continue
            array = result.output(tensor.name).to_numpy()  # by name: versions may reorder
            if array.shape[1:] != first.shape[1:] or array.shape[0] != 1:
                raise ValueError(
                    f"row {row}: output {tensor.name!r} has shape {list(array.shape)}, "
                    f"not [1, {', '.join(map(str, first.shape[1:]))}]: write .jsonl instead"
                )
            stacked[row] = array[0]
        columns[tensor.name] = stacked
    return columns


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as parquet  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install 'inferq[parquet]'") from None
    return parquet
