"""What every peer shares: its command line, loading the model, and running it on requests.

Kept apart from the peers' loops so each loop file reads like the code a user would write,
and so all peers answer in exactly inferq's wire format (the harness counts and decodes them).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from schemas.codec import ContentType, content_type_of, decode_request, encode_result
from schemas.messages import InferenceRequest, InferenceResult
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from workers.formats import Forward
from workers.repository import open_version


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerOptions:
    """The command line shared by the peers."""

    bootstrap: str
    """Kafka bootstrap servers, `host:port[,host:port...]`."""
    redis: str
    """Redis DSN, `redis://host:port/db`."""
    prefix: str
    """Topic and Redis key prefix, as in `TopicNames`."""
    model: str
    """The model name: requests are read from `{prefix}.requests.{model}`."""
    version: int
    """The model version loaded from `{models_dir}/{model}/{version}/`."""
    models_dir: Path
    """The model repository written by `python -m workers.example_models`."""
    group: str
    """The Kafka consumer group id."""
    ttl_s: int
    """Lifetime of each result in Redis, in seconds."""
    threads: int
    """torch intra-op threads (`torch.set_num_threads`)."""
    max_records: int
    """Batch mode only: the most records one handler call receives."""
    mode: str
    """FastStream peer only: `message` or `batch`."""
    quiet: bool
    """FastStream peer only: turn off FastStream's per-message log lines (`logger=None`)."""

    @property
    def topics(self) -> TopicNames:
        """The deployment's topic names and Redis keys."""
        return TopicNames(prefix=self.prefix)


def parse_options(
    description: str, argv: Sequence[str] | None = None, *, with_mode: bool = False
) -> PeerOptions:
    """Parse the peers' shared command line (plus `--mode` for the FastStream peer)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis DSN")
    parser.add_argument("--prefix", default="inferq", help="topic and Redis key prefix")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", type=int, default=1, help="model version (default 1)")
    parser.add_argument("--models-dir", type=Path, required=True, help="model repository")
    parser.add_argument("--group", required=True, help="Kafka consumer group id")
    parser.add_argument("--ttl-s", type=int, default=3600, help="result lifetime in Redis, s")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--max-records", type=int, default=32, help="batch mode: records per handler call"
    )
    if with_mode:
        parser.add_argument("--mode", choices=("message", "batch"), default="message")
        parser.add_argument(
            "--quiet",
            action="store_true",
            help="no FastStream per-message log (its default logs each message twice at INFO)",
        )
    args = parser.parse_args(argv)
    if args.threads < 1 or args.max_records < 1 or args.ttl_s < 1 or args.version < 1:
        parser.error("--threads, --max-records, --ttl-s and --version must be at least 1")
    return PeerOptions(
        bootstrap=args.bootstrap,
        redis=args.redis,
        prefix=args.prefix,
        model=args.model,
        version=args.version,
        models_dir=args.models_dir,
        group=args.group,
        ttl_s=args.ttl_s,
        threads=args.threads,
        max_records=args.max_records,
        mode=getattr(args, "mode", "message"),
        quiet=getattr(args, "quiet", False),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerModel:
    """A loaded model (any format inferq serves) and the tensor names of its signature."""

    name: str
    version: int
    module: Forward
    input_names: tuple[str, ...]
    """The inputs in the order `forward` takes them."""
    output_name: str
    """The name the first output is answered under."""


def load_model(options: PeerOptions) -> PeerModel:
    """Load the model version named by `options`, after setting torch's thread count."""
    torch.set_num_threads(options.threads)
    directory = options.models_dir / options.model / str(options.version)
    loaded = open_version(directory)
    return PeerModel(
        name=options.model,
        version=options.version,
        module=loaded.module,
        input_names=tuple(spec.name for spec in loaded.config.inputs),
        output_name=loaded.config.outputs[0].name,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Received:
    """A decoded request and the encoding its answer must use."""

    request: InferenceRequest
    content_type: ContentType


def decode(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> Received:
    """Decode one request record; raises `SchemaError` for a malformed one."""
    content_type = content_type_of(headers)
    return Received(request=decode_request(value or b"", content_type), content_type=content_type)


def forward(model: PeerModel, requests: Sequence[InferenceRequest]) -> list[torch.Tensor]:
    """Run the model once on all `requests` (stacked on the batch dimension); one output each."""
    if len(requests) == 1:
        inputs = [requests[0].input(name).to_torch() for name in model.input_names]
    else:
        inputs = [
            torch.cat([request.input(name).to_torch() for request in requests])
            for name in model.input_names
        ]
    with torch.inference_mode():
        output = model.module(*inputs)
    if isinstance(output, (tuple, list)):
        output = output[0]
    if len(requests) == 1:
        return [output]
    rows = [request.input(model.input_names[0]).shape[0] for request in requests]
    return list(torch.split(output, rows))


def encode_answer(
    model: PeerModel, received: Received, output: torch.Tensor, *, worker: str
) -> bytes:
    """The encoded `ok` result of one request, in its request's encoding."""
    result = InferenceResult.success(
        received.request.id,
        model.name,
        model.version,
        outputs=[Tensor.from_torch(model.output_name, output)],
        worker=worker,
    )
    return encode_result(result, received.content_type)


def result_topic(topics: TopicNames, request: InferenceRequest) -> str:
    """Where a request's result goes: its `reply_to`, else `{prefix}.results.{model}`."""
    return request.reply_to or topics.results(request.model)


def worker_id(peer: str) -> str:
    """The `worker` field of this process's results."""
    return f"{peer}-{os.getpid()}"
