"""Every model format inferq loads, served side by side by one worker: the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producers.load import publish, random_requests
from schemas.messages import ResultStatus
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import Deployment, running_worker, wait_until_ready
from workers.example_models import EXAMPLE_MODELS, write_example
from workers.formats import ModelFormat
from workers.repository import ModelManifest, VersionPolicy

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

FORMATS = list(ModelFormat)


async def test_the_formats_of_one_model_give_the_same_outputs_through_a_worker(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Version i of `formats` is mlp's version 1 saved in the i-th format (AOTInductor packages
    # are compiled once per machine and cached, see workers.authoring).
    for version, fmt in enumerate(FORMATS, start=1):
        write_example(deployment.models_dir, EXAMPLE_MODELS[0], fmt, name="formats",
                      version=version)  # fmt: skip
    (deployment.models_dir / "formats" / "model.json").write_text(
        ModelManifest(version_policy=VersionPolicy(all=True)).model_dump_json()
    )
    base = random_requests(model="formats", count=40, input_name="input", row_shape=[784])
    requests = [
        request.model_copy(update={"id": f"{fmt.value}-{i}", "version": version})
        for version, fmt in enumerate(FORMATS, start=1)
        for i, request in enumerate(base)
    ]
    async with running_worker(deployment) as running, deployment.client() as client:
        await wait_until_ready(running)
        served = {(s.version, s.format) for s in running.repository.statuses()
                  if s.model == "formats"}  # fmt: skip
        assert served == set(enumerate(FORMATS, start=1))
        await bounded(publish(client, requests), what="publishing", timeout_s=60)
        results = await client.results([r.id for r in requests], timeout_s=120)
    assert all(r.status is ResultStatus.OK for r in results.values())
    reference = FORMATS.index(ModelFormat.TORCH_EXPORT) + 1
    for i in range(len(base)):
        expected = results[f"{FORMATS[reference - 1].value}-{i}"].outputs[0].to_numpy()
        for version, fmt in enumerate(FORMATS, start=1):
            result = results[f"{fmt.value}-{i}"]
            assert result.version == version
            np.testing.assert_allclose(result.outputs[0].to_numpy(), expected, rtol=1e-4, atol=1e-5)
