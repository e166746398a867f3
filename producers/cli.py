"""``inferq-produce``: backfill a dataset, publish one request, load-test, read a result.

inferq-produce backfill --model mlp --input rows.npy --run 2026-12-01 [--rate 5000]
inferq-produce publish --model mlp --input row.npy        # prints the result
inferq-produce send --model mlp --shape 784 --count 10000 --wait   # random inputs
inferq-produce get REQUEST_ID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from producers.backfill import BackfillPlan, Progress, default_output, json_reporter, run_backfill
from producers.client import InferenceClient, InferenceClientError, ResultTimeoutError
from producers.datasets import open_dataset
from producers.load import publish, random_requests
from producers.settings import ProducerSettings
from schemas.names import model_name_argument, version_argument

console = Console()


async def send(args: argparse.Namespace, settings: ProducerSettings) -> int:
    row_shape = [int(dim) for dim in args.shape.split(",")]
    requests = random_requests(
        model=args.model,
        count=args.count,
        input_name=args.input,
        row_shape=row_shape,
        seed=args.seed,
        version=args.version,
    )
    async with InferenceClient(settings=settings) as client:
        started = time.perf_counter()
        await publish(client, requests)
        console.print(f"published {len(requests)} requests in {time.perf_counter() - started:.2f}s")
        if not args.wait:
            return 0
        try:
            results = await client.results([r.id for r in requests], timeout_s=args.timeout)
        except ResultTimeoutError as error:
            console.print(f"[red]{error}[/red]")
            return 1
    failed = [r for r in results.values() if not r.ok]
    console.print(f"{len(results)} results, {len(failed)} not ok")
    for result in failed[:10]:
        console.print(f"  {result.id}: {result.status} {result.error}")
    return 1 if failed else 0


async def get(args: argparse.Namespace, settings: ProducerSettings) -> int:
    async with InferenceClient(settings=settings) as client:
        try:
            results = await client.results([args.id], timeout_s=args.timeout)
        except ResultTimeoutError as error:
            console.print(f"[red]{error}[/red]")
            return 1
    result = results[args.id]
    console.print(result.model_dump(exclude={"outputs"}))
    for tensor in result.outputs:
        console.print(f"{tensor.name} {tensor.datatype} {list(tensor.shape)}: {tensor.to_numpy()}")
    return 0


async def publish_one(args: argparse.Namespace, settings: ProducerSettings) -> int:
    inputs = _read_inputs(args.input, args.input_name)
    async with InferenceClient(settings=settings) as client:
        try:
            prediction = await client.infer(
                args.model, inputs, version=args.version, timeout_s=args.timeout,
                raise_on_error=False,
            )  # fmt: skip
        except (ResultTimeoutError, InferenceClientError) as error:
            console.print(f"[red]{error}[/red]")
            return 1
    result = prediction.result
    console.print(result.model_dump(exclude={"outputs"}))
    for tensor in result.outputs:
        console.print(f"{tensor.name} {tensor.datatype} {list(tensor.shape)}: {tensor.to_numpy()}")
    return 0 if prediction.ok else 1


def _read_inputs(path: Path, input_name: str) -> dict[str, Any]:
    """A `.npy` array (one input), an `.npz` (named inputs) or a JSON object name → list."""
    if path.suffix == ".npy":
        return {input_name: np.load(path)}
    if path.suffix == ".npz":
        archive = np.load(path)
        return {name: archive[name] for name in archive.files}
    content = json.loads(path.read_text())
    if not isinstance(content, dict):
        raise SystemExit(f"{path}: expected a JSON object of input name to (nested) list")
    return {name: np.asarray(value, dtype=np.float32) for name, value in content.items()}


async def backfill(args: argparse.Namespace, settings: ProducerSettings) -> int:
    try:
        return await _backfill(args, settings)
    except (ResultTimeoutError, InferenceClientError, OSError, ValueError) as error:
        console.print(f"[red]backfill {args.run} stopped: {error}[/red]")
        console.print(f"what was answered is kept: run it again with --run {args.run}")
        return 1


async def _backfill(args: argparse.Namespace, settings: ProducerSettings) -> int:
    plan = BackfillPlan(
        model=args.model,
        dataset=open_dataset(args.input, input_name=args.input_name, dtype=args.dtype),
        output=args.output or default_output(args.input),
        run_id=args.run,
        version=args.version,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
    )
    if args.quiet:
        return _summary(await run_backfill(plan, settings), plan, quiet=True)
    if not sys.stdout.isatty() or args.json_progress:
        return _summary(await run_backfill(plan, settings, json_reporter()), plan, quiet=True)
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
    )  # fmt: skip
    with RichProgress(*columns, console=console) as bar:
        task = bar.add_task(f"backfill {plan.run_id}", total=plan.dataset.rows, detail="")

        def show(progress: Progress) -> None:
            detail = (f"published {progress.published:,}  errors {progress.errors:,}  "
                      f"{progress.rate:,.0f} rows/s")  # fmt: skip
            bar.update(task, completed=progress.done, detail=detail)

        outcome = await run_backfill(plan, settings, show)
    return _summary(outcome, plan, quiet=False)


def _summary(outcome: tuple[Progress, list[Any]], plan: BackfillPlan, *, quiet: bool) -> int:
    progress, _ = outcome
    if quiet:
        print(json.dumps({"event": "backfill_done", "output": str(plan.output),
                          **progress.as_dict()}))  # fmt: skip
    else:
        table = Table(title=f"backfill {plan.run_id}: {plan.output}")
        for column in ("rows", "resumed", "published", "answered", "errors", "rows/s"):
            table.add_column(column, justify="right")
        table.add_row(*(f"{v:,}" for v in (progress.rows, progress.resumed, progress.published,
                                           progress.answered, progress.errors)),
                      f"{progress.rate:,.0f}")  # fmt: skip
        console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; settings come from INFERQ_*."""
    parser = argparse.ArgumentParser(prog="inferq-produce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    send_parser = commands.add_parser("send", help="publish requests with random FP32 inputs")
    send_parser.add_argument("--model", required=True, type=model_name_argument)
    send_parser.add_argument("--version", type=version_argument, default=None)
    send_parser.add_argument("--input", default="input", help="input tensor name")
    send_parser.add_argument("--shape", required=True, help="one row's shape, e.g. 784 or 3,64,64")
    send_parser.add_argument("--count", type=int, default=1)
    send_parser.add_argument("--seed", type=int, default=0)
    send_parser.add_argument("--wait", action="store_true", help="wait for every result")
    send_parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    fill = commands.add_parser("backfill", help="answer every row of a dataset, in order")
    fill.add_argument("--model", required=True, type=model_name_argument)
    fill.add_argument("--version", type=version_argument, default=None)
    fill.add_argument("--input", type=Path, required=True, help=".npy, .npz, .jsonl or .parquet")
    fill.add_argument("--output", type=Path, help="default: {input stem}.results.{npz|jsonl|...}")
    fill.add_argument("--run", required=True, help="run id: the same id resumes the run")
    fill.add_argument("--input-name", default="input", help="the input's name, for .npy")
    fill.add_argument("--dtype", default="float32", help="element type of .jsonl/.parquet rows")
    fill.add_argument("--rate", type=float, help="rows per second at most (default: no cap)")
    fill.add_argument("--max-in-flight", type=int, default=5000)
    fill.add_argument("--timeout", type=float, default=300.0, help="seconds one row may wait")
    fill.add_argument("--quiet", action="store_true", help="only the final summary (JSON)")
    fill.add_argument("--json-progress", action="store_true", help="JSON lines even on a tty")
    one = commands.add_parser("publish", help="run one request and print its result")
    one.add_argument("--model", required=True, type=model_name_argument)
    one.add_argument("--version", type=version_argument, default=None)
    one.add_argument("--input", type=Path, required=True, help=".npy, .npz or a JSON object")
    one.add_argument("--input-name", default="input", help="the input's name, for .npy")
    one.add_argument("--timeout", type=float, default=30.0)
    get_parser = commands.add_parser("get", help="print the cached result of a request id")
    get_parser.add_argument("id")
    get_parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    settings = ProducerSettings()
    commands_by_name = {"send": send, "get": get, "backfill": backfill, "publish": publish_one}
    return asyncio.run(commands_by_name[args.command](args, settings))


if __name__ == "__main__":
    sys.exit(main())
