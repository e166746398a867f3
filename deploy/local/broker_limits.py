"""The local broker's size limits and threads, and the JVM memory derived from them."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class BrokerLimits:
    """The broker's size limits and threads, and the JVM memory they need; all sizes in bytes.

    message_max_bytes: the largest record batch the broker appends (a 64 MiB request record of
    the workers' `max_message_bytes` default, plus room for its batch and record headers).
    socket_request_max_bytes: the largest request the broker reads; a client's requests must
    stay below it (see `ProducerSettings.max_request_bytes`).
    queued_request_bytes: received requests held in the heap at once; past it the network threads
    stop reading until requests are handled (Kafka lets one more request in beyond it).
    network_threads, io_threads: the broker's socket and request-handler threads.
    base_heap_bytes: the heap of the broker itself, requests aside.

    Direct memory: the JDK reads and writes a heap buffer through a temporary direct buffer as
    large as it, and keeps it for the thread's next I/O. A network thread reads whole requests
    and an I/O thread appends them to the log, so each keeps one buffer up to the largest request.
    With the JDK's default limit (the heap, 512 MiB) and Kafka's default threads (3 + 8), a few
    64 MiB produce requests failed with ``OutOfMemoryError: Cannot reserve ... direct buffer
    memory`` until the broker was restarted. Not caching large buffers at all
    (``jdk.nio.maxCachedBufferSize=262144``) avoids that but allocates and zeroes a fresh
    request-sized buffer for every socket read: a 60 MiB produce took 5 s instead of 0.6 s. So
    buffers are cached up to one request, and direct memory holds one per thread.
    """

    message_max_bytes: int = 65 * MIB
    socket_request_max_bytes: int = 100 * MIB
    queued_request_bytes: int = 100 * MIB
    network_threads: int = 2
    io_threads: int = 4
    base_heap_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        if not 0 < self.message_max_bytes < self.socket_request_max_bytes:
            raise ValueError("message_max_bytes: must be positive and below the request limit")
        if self.queued_request_bytes < self.socket_request_max_bytes:
            raise ValueError("queued_request_bytes: must hold at least one largest request")
        if self.network_threads < 1 or self.io_threads < 1:
            raise ValueError("network_threads, io_threads: the broker needs at least one of each")

    @property
    def heap_bytes(self) -> int:
        """The broker's own heap, the queued requests and the one request let in beyond them."""
        return self.base_heap_bytes + self.queued_request_bytes + self.socket_request_max_bytes

    @property
    def direct_memory_bytes(self) -> int:
        """A request-sized temporary buffer per network and I/O thread, and one for the rest."""
        threads = self.network_threads + self.io_threads + 1
        return threads * self.socket_request_max_bytes

    def jvm_options(self) -> list[str]:
        """Heap, direct memory and the largest cached temporary buffer, as `java` options."""
        return [
            f"-Xmx{self.heap_bytes // MIB}m",
            f"-XX:MaxDirectMemorySize={self.direct_memory_bytes // MIB}m",
            f"-Djdk.nio.maxCachedBufferSize={self.socket_request_max_bytes}",
        ]

    def server_properties(self) -> dict[str, str]:
        """The broker settings these limits stand for."""
        return {
            "message.max.bytes": str(self.message_max_bytes),
            "socket.request.max.bytes": str(self.socket_request_max_bytes),
            "queued.max.request.bytes": str(self.queued_request_bytes),
            "num.network.threads": str(self.network_threads),
            "num.io.threads": str(self.io_threads),
        }


def java_size_bytes(size: str) -> int:
    """A JVM memory size such as ``512m`` or ``1g``, in bytes."""
    units = {"k": 1024, "m": MIB, "g": 1024 * MIB}
    text = size.strip().lower()
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)
