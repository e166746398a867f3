"""A synchronous facade over `InferenceClient`, for scripts and threaded services.

The async client runs on an event loop of its own, in a daemon thread; every call is handed
to that loop (`asyncio.run_coroutine_threadsafe`) and waited on, so any number of threads may
call one facade at once, and their calls share its producer and reply topic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from producers.client import InferenceClient
from producers.inputs import Inputs, Prediction
from producers.settings import ProducerSettings
from schemas.messages import InferenceResult

T = TypeVar("T")
CALL_MARGIN_S = 15.0
"""Extra time a thread waits beyond a call's own timeout before it gives up on the loop."""


class SyncInferenceClient:
    """`submit`, `infer` and `results` of `InferenceClient`, blocking and thread-safe.

    Use as ``with SyncInferenceClient() as client: client.infer("mlp", {"input": x})``.
    """

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="inferq-client", daemon=True
        )
        self._thread.start()
        self._closed = False

        async def started() -> InferenceClient:
            # Built on its loop: aiokafka binds to the loop it is created on.
            client = InferenceClient(settings=settings or ProducerSettings())
            await client.start()
            return client

        try:
            self._client = self._call(started(), timeout_s=None)
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T], *, timeout_s: float | None) -> T:
        if self._closed:
            coroutine.close()
            raise RuntimeError("the client is closed")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(None if timeout_s is None else timeout_s + CALL_MARGIN_S)
        except BaseException:
            future.cancel()  # a caller that gave up leaves nothing running on the loop
            raise

    def submit(self, model: str, inputs: Inputs, **options: Any) -> str:
        """`InferenceClient.submit`: publish one request, return its id once Kafka acked it."""
        return self._call(self._client.submit(model, inputs, **options), timeout_s=None)

    def infer(
        self, model: str, inputs: Inputs, *, timeout_s: float = 30.0, **options: Any
    ) -> Prediction:
        """`InferenceClient.infer`: run one request and wait for its answer."""
        return self._call(
            self._client.infer(model, inputs, timeout_s=timeout_s, **options), timeout_s=timeout_s
        )

    def results(self, request_ids: list[str], *, timeout_s: float) -> Mapping[str, InferenceResult]:
        """`InferenceClient.results`: the results of submitted requests."""
        return self._call(self._client.results(request_ids, timeout_s=timeout_s),
                          timeout_s=timeout_s)  # fmt: skip

    def close(self) -> None:
        """Flush, disconnect and stop the loop's thread. Idempotent."""
        if self._closed:
            return
        try:
            self._call(self._client.close(), timeout_s=None)
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
