"""Backfill datasets and result files, and the checkpoint a killed run resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from producers.backfill import Checkpoint, default_output
from producers.datasets import open_dataset, write_results
from schemas.errors import ErrorCode
from schemas.messages import ErrorInfo, InferenceResult, ResultStatus
from schemas.tensors import Tensor


def ok(row: int, value: float) -> InferenceResult:
    output = Tensor.from_numpy("score", np.full((1, 2), value, np.float32))
    return InferenceResult(id=f"r:{row}", model="m", version=3, status=ResultStatus.OK,
                           outputs=(output,))  # fmt: skip


def failed(row: int) -> InferenceResult:
    error = ErrorInfo(code=ErrorCode.SHAPE_MISMATCH, message="bad shape")
    return InferenceResult(id=f"r:{row}", model="m", status=ResultStatus.ERROR, error=error)


def test_npy_npz_and_jsonl_rows_are_requests_of_one_row(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "b.npz", x=data, mask=np.ones((3, 2), np.int64))
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"x": row.tolist()}) + "\n" for row in data)
    )
    for name in ("a.npy", "b.npz", "c.jsonl"):
        dataset = open_dataset(tmp_path / name, input_name="x")
        assert dataset.rows == 3
        row = dataset.row(2)
        np.testing.assert_array_equal(row["x"], data[2:3])
        assert row["x"].dtype == np.float32
    assert open_dataset(tmp_path / "b.npz").row(0)["mask"].shape == (1, 2)
    with pytest.raises(ValueError, match="unknown dataset type"):
        open_dataset(tmp_path / "d.csv")


def test_results_are_written_in_row_order_with_the_errors(tmp_path: Path) -> None:
    results = [ok(0, 1.0), failed(1), ok(2, 3.0)]
    write_results(tmp_path / "out.npz", results)
    written = np.load(tmp_path / "out.npz")
    assert list(written["status"]) == ["ok", "error", "ok"]
    assert list(written["error_code"]) == ["", "SHAPE_MISMATCH", ""]
    assert list(written["version"]) == [3, -1, 3]
    np.testing.assert_array_equal(written["score"][[0, 2]], [[1, 1], [3, 3]])
    assert np.isnan(written["score"][1]).all()
    write_results(tmp_path / "out.jsonl", results)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2]
    assert lines[1]["error"] == {"code": "SHAPE_MISMATCH", "message": "bad shape"}
    assert lines[2]["outputs"] == {"score": [[3.0, 3.0]]}
    assert default_output(Path("d/rows.npy")) == Path("d/rows.results.npz")


def test_a_checkpoint_torn_by_a_kill_keeps_every_whole_pair(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path / "run.progress")
    for row in range(5):
        checkpoint.append(row, ok(row, float(row)))
    checkpoint.close()
    data = (tmp_path / "run.progress").read_bytes()
    (tmp_path / "run.progress").write_bytes(data[:-7])  # the last pair, half written
    read = Checkpoint(tmp_path / "run.progress").read()
    assert sorted(read) == [0, 1, 2, 3]
    assert read[3].outputs[0].to_numpy().tolist() == [[3.0, 3.0]]


def test_parquet_rows_and_results_when_pyarrow_is_installed(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pyarrow.table({"x": [[1.0, 2.0], [3.0, 4.0]]}), tmp_path / "d.parquet")
    dataset = open_dataset(tmp_path / "d.parquet")
    np.testing.assert_array_equal(dataset.row(1)["x"], [[3.0, 4.0]])
    write_results(tmp_path / "out.parquet", [ok(0, 1.0), failed(1)])
    records = parquet.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[1]["error"] == {"code": "SHAPE_MISMATCH", "message": "bad shape"}


def test_a_checkpoint_resumed_after_a_torn_pair_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "run.progress"
    checkpoint = Checkpoint(path)
    for row in range(3):
        checkpoint.append(row, ok(row, float(row)))
    checkpoint.close()
    path.write_bytes(path.read_bytes()[:-20])  # killed mid-write
    resumed = Checkpoint(path)
    assert sorted(resumed.read()) == [0, 1]
    for row in (2, 3, 4):
        resumed.append(row, ok(row, float(row)))
    resumed.close()
    assert sorted(Checkpoint(path).read()) == [0, 1, 2, 3, 4]
