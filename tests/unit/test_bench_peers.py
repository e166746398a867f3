"""The benchmark peers answer in inferq's wire format, one request or a stacked batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.peers.common import decode, encode_answer, forward, load_model, parse_options
from producers.load import random_requests
from schemas.codec import ContentType, content_type_header, decode_result, encode_request
from workers.example_models import write_example_models


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    write_example_models(root)
    return root


def test_options_default_and_validate(examples: Path) -> None:
    argv = ["--model", "mlp", "--models-dir", str(examples), "--group", "g"]
    options = parse_options("peer", argv, with_mode=True)
    assert (options.version, options.ttl_s, options.threads, options.max_records) == (
        1,
        3600,
        1,
        32,
    )
    assert (options.mode, options.quiet) == ("message", False)
    with pytest.raises(SystemExit):
        parse_options("peer", [*argv, "--threads", "0"])


@pytest.mark.parametrize("content_type", list(ContentType))
def test_batched_answers_match_one_at_a_time(examples: Path, content_type: ContentType) -> None:
    options = parse_options(
        "peer", ["--model", "mlp", "--models-dir", str(examples), "--group", "g"]
    )
    model = load_model(options)
    requests = random_requests(model="mlp", count=5, input_name="input", row_shape=(784,))
    received = [
        decode(encode_request(r, content_type), [content_type_header(content_type)])
        for r in requests
    ]
    batched = forward(model, [r.request for r in received])
    for one, output in zip(received, batched, strict=True):
        (alone,) = forward(model, [one.request])
        np.testing.assert_allclose(output.numpy(), alone.numpy(), rtol=1e-5, atol=1e-6)
        result = decode_result(encode_answer(model, one, output, worker="w"), content_type)
        assert (result.id, result.ok, result.version) == (one.request.id, True, 1)
        assert result.output("logits").shape == (1, 10)
