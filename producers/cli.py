"""``inferq-produce``: publish requests with random inputs, or read a result by id."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from rich.console import Console

from producers.client import InferenceClient, ResultTimeoutError
from producers.load import publish, random_requests
from producers.settings import ProducerSettings

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


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; settings come from INFERQ_*."""
    parser = argparse.ArgumentParser(prog="inferq-produce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    send_parser = commands.add_parser("send", help="publish requests with random FP32 inputs")
    send_parser.add_argument("--model", required=True)
    send_parser.add_argument("--version", type=int, default=None)
    send_parser.add_argument("--input", default="input", help="input tensor name")
    send_parser.add_argument("--shape", required=True, help="one row's shape, e.g. 784 or 3,64,64")
    send_parser.add_argument("--count", type=int, default=1)
    send_parser.add_argument("--seed", type=int, default=0)
    send_parser.add_argument("--wait", action="store_true", help="wait for every result")
    send_parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    get_parser = commands.add_parser("get", help="print the cached result of a request id")
    get_parser.add_argument("id")
    get_parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    settings = ProducerSettings()
    command = send if args.command == "send" else get
    return asyncio.run(command(args, settings))


if __name__ == "__main__":
    sys.exit(main())
