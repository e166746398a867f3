"""Topic names, header names and Redis keys."""

from __future__ import annotations

import pytest

from schemas import DEFAULT_PREFIX, HEADER_CONTENT_TYPE, TopicNames
from schemas.topics import HEADER_ERROR_CODE, HEADER_ERROR_MESSAGE, HEADER_SOURCE


def test_default_names() -> None:
    topics = TopicNames()
    assert topics.prefix == DEFAULT_PREFIX == "inferq"
    assert topics.requests("resnet50") == "inferq.requests.resnet50"
    assert topics.results("resnet50") == "inferq.results.resnet50"
    assert topics.dead_letters == "inferq.dlq"
    assert topics.result_key("req-1") == "inferq:result:req-1"


def test_custom_prefix() -> None:
    topics = TopicNames(prefix="test-42")
    assert topics.requests("m") == "test-42.requests.m"
    assert topics.dead_letters == "test-42.dlq"
    assert topics.result_key("a:b") == "test-42:result:a:b"


def test_header_names() -> None:
    assert HEADER_CONTENT_TYPE == "content-type"
    assert (HEADER_ERROR_CODE, HEADER_ERROR_MESSAGE, HEADER_SOURCE) == (
        "inferq-error-code",
        "inferq-error-message",
        "inferq-source",
    )


def test_model_of_request_topic() -> None:
    topics = TopicNames(prefix="p")
    assert topics.model_of_request_topic("p.requests.mnist") == "mnist"
    assert topics.model_of_request_topic("p.requests.a.b") == "a.b"
    assert topics.model_of_request_topic("p.results.mnist") is None
    assert topics.model_of_request_topic("q.requests.mnist") is None
    assert topics.model_of_request_topic("p.requests.") is None
    assert topics.model_of_request_topic(topics.requests("x")) == "x"


@pytest.mark.parametrize("prefix", ["", "has space", "a/b", ".", "x" * 240])
def test_a_prefix_that_cannot_start_a_topic_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match=r"^prefix: "):
        TopicNames(prefix=prefix)


@pytest.mark.parametrize("model", ["", "a/b", "ü", "x" * 240])
def test_a_model_that_cannot_be_in_a_topic_is_refused(model: str) -> None:
    with pytest.raises(ValueError, match=r"^model: "):
        TopicNames().requests(model)


def test_empty_request_id_has_no_key() -> None:
    with pytest.raises(ValueError, match=r"^request_id: "):
        TopicNames().result_key("")


def test_topic_names_are_frozen_and_keyword_only() -> None:
    topics = TopicNames()
    with pytest.raises(AttributeError):
        topics.prefix = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TopicNames("x")  # type: ignore[misc]
