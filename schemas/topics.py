"""Kafka topic names, record header names and Redis keys: the one place both sides read them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX: Final = "inferq"
"""The prefix of every topic and Redis key unless configured otherwise."""

HEADER_CONTENT_TYPE: Final = "content-type"
"""Record header naming the encoding of the value; `application/msgpack` when absent."""
HEADER_ERROR_CODE: Final = "inferq-error-code"
"""Dead-letter header: the `ErrorCode` that made the record unanswerable."""
HEADER_ERROR_MESSAGE: Final = "inferq-error-message"
"""Dead-letter header: the human-readable reason, naming the field at fault."""
HEADER_SOURCE: Final = "inferq-source"
"""Dead-letter header: where the record was read, as `topic/partition/offset`."""
HEADER_ORIGINAL_SIZE: Final = "inferq-original-size"
"""Dead-letter header, when the value was too large to keep: its length in bytes (decimal)."""
HEADER_ORIGINAL_SHA256: Final = "inferq-original-sha256"
"""Dead-letter header, when the value was too large to keep: its SHA-256 (hex)."""
HEADERS_DROPPED: Final = "inferq-headers-dropped"
"""Dead-letter header, when even the original headers were too large to keep: their count."""
INTERNAL_TOPIC_PREFIX: Final = "__"
"""Kafka's own topics (`__consumer_offsets`, `__transaction_state`) start with this."""

MAX_TOPIC_LENGTH: Final = 249
"""Kafka's own limit on a topic name's length."""

TOPIC_NAME_PATTERN: Final = r"^[A-Za-z0-9._-]{1,249}$"
"""The characters Kafka accepts in a topic name (also the rule for model names and `reply_to`)."""

_TOPIC_NAME = re.compile(TOPIC_NAME_PATTERN)
_REQUESTS = ".requests."
_RESULTS = ".results."


def is_topic_name(name: str) -> bool:
    """Whether `name` is a legal Kafka topic name (1 to 249 of `[A-Za-z0-9._-]`, not `.`/`..`)."""
    return _TOPIC_NAME.fullmatch(name) is not None and name not in {".", ".."}


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicNames:
    """The topics and Redis keys of one inferq deployment, all derived from `prefix`."""

    prefix: str = DEFAULT_PREFIX
    """Starts every topic (`{prefix}.requests.{model}`) and Redis key (`{prefix}:result:{id}`)."""

    def __post_init__(self) -> None:
        longest_suffix = len(_RESULTS) + 1
        if not is_topic_name(self.prefix) or len(self.prefix) + longest_suffix > MAX_TOPIC_LENGTH:
            raise ValueError(f"prefix: {self.prefix!r} cannot start a Kafka topic name")

    def requests(self, model: str) -> str:
        """The topic that carries requests for `model`."""
        return self._topic(_REQUESTS, model)

    def results(self, model: str) -> str:
        """The topic results of `model` go to when the request has no `reply_to`."""
        return self._topic(_RESULTS, model)

    @property
    def reply_prefix(self) -> str:
        """What a client's reply topic starts with, and what workers accept by default."""
        return f"{self.prefix}.replies."

    def replies(self, name: str) -> str:
        """A reply topic (a `reply_to` that workers accept by default) named ``name``."""
        topic = self.reply_prefix + name
        if not name or not is_topic_name(topic) or len(topic) > MAX_TOPIC_LENGTH:
            raise ValueError(f"name: {name!r} cannot end a Kafka topic name ({topic!r})")
        return topic

    @property
    def dead_letters(self) -> str:
        """The topic of records that could not be answered at all (their id was unreadable)."""
        return f"{self.prefix}.dlq"

    def result_key(self, request_id: str) -> str:
        """The Redis key holding the encoded result of `request_id`."""
        if not request_id:
            raise ValueError("request_id: must not be empty")
        return f"{self.prefix}:result:{request_id}"

    def digest_key(self, request_id: str) -> str:
        """The Redis key holding the digest of the request whose result is cached for `request_id`.

        It binds the id to that request: another request with the same id but other inputs is
        answered `DUPLICATE_ID`, never with this result. Its hash tag is the result key
        (`{prefix}:digest:{{prefix}:result:{id}}`), so both lie in one Redis Cluster hash slot
        and one script writes them together (an id has no braces, by the id rule).
        """
        return f"{self.prefix}:digest:{{{self.result_key(request_id)}}}"

    def is_reserved(self, topic: str) -> bool:
        """Whether `topic` is one no result may be sent to by request: a request, result or
        dead-letter topic of this prefix, or one of Kafka's internal topics."""
        return (
            topic.startswith(INTERNAL_TOPIC_PREFIX)
            or topic == self.dead_letters
            or topic.startswith(self.prefix + _REQUESTS)
            or topic.startswith(self.prefix + _RESULTS)
        )

    def model_of_request_topic(self, topic: str) -> str | None:
        """The model a request topic of this prefix serves; None for any other topic."""
        head = self.prefix + _REQUESTS
        if not topic.startswith(head):
            return None
        model = topic[len(head) :]
        return model if model and is_topic_name(model) else None

    def _topic(self, kind: str, model: str) -> str:
        topic = f"{self.prefix}{kind}{model}"
        if not model or not is_topic_name(model) or len(topic) > MAX_TOPIC_LENGTH:
            raise ValueError(f"model: {model!r} cannot be part of a Kafka topic name ({topic!r})")
        return topic


def raise_topic_errors(response: object) -> bool:
    """Raise the first per-topic error of a Kafka CreateTopics answer (aiokafka returns them
    and never raises); a topic that exists already is no error. True if all were created."""
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    created = True
    for entry in getattr(response, "topic_errors", ()):
        code = entry[1]
        if code == 0:
            continue
        error = for_code(code)
        if error is TopicAlreadyExistsError:
            created = False
            continue
        message = entry[2] if len(entry) > 2 else ""
        raise error(f"creating topic {entry[0]}: {message}")
    return created
