"""`read_replies`: a store read is whole or it is the store failing, never a silently missing feature."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError

from extproc.adapters.redis_store import read_replies
from extproc.errors import FeatureStoreUnavailable

WHOLE = [[b"1", None], [None, None]]


def reads(*answers: Any) -> tuple[Any, list[int]]:
    """A read that gives (or raises) each answer in turn, and the list counting its calls."""
    calls: list[int] = []

    async def read() -> list[Any]:
        calls.append(1)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)

    return read, calls


async def test_whole_replies_pass_unchanged() -> None:
    """Two HMGET answers of two fields each, nulls included, come back as they are, read once."""
    read, calls = reads(WHOLE)
    assert await read_replies(read, attempts=3, widths=[2, 2]) == WHOLE
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("bad", "cause"),
    [
        ([[b"1", None], None], "reply 1 is not an answer to HMGET of 2 fields: None"),
        ([[b"1", None], [None]], "reply 1 is not an answer to HMGET of 2 fields"),
        ([[b"1", None]], "1 replies to 2 commands"),
        ([[b"1", None], MovedError("3999 127.0.0.1:6381")], "3999 127.0.0.1:6381"),
        (RedisConnectionError("Connection closed by server."), "Connection closed by server."),
        (AttributeError("'NoneType' object has no attribute 'writelines'"), "AttributeError: 'NoneType' object"),
    ],
    ids=["null-reply", "short-reply", "missing-reply", "error-in-replies", "connection-lost", "client-race"],
)
async def test_a_broken_read_is_unavailable_after_bounded_attempts(bad: Any, cause: str) -> None:
    """A reply lost or broken on the way is the store failing (503), tried a bounded number of times."""
    read, calls = reads(bad)
    with pytest.raises(FeatureStoreUnavailable) as caught:
        await read_replies(read, attempts=3, widths=[2, 2])
    assert cause in str(caught.value)
    assert len(calls) == 3


async def test_a_retry_that_succeeds_answers() -> None:
    """A failover's first failure, then a whole answer: the caller gets the answer."""
    read, calls = reads(RedisConnectionError("Connection closed by server."), WHOLE)
    assert await read_replies(read, attempts=3, widths=[2, 2]) == WHOLE
    assert len(calls) == 2


async def test_a_spent_budget_stops_the_retries() -> None:
    """The caller's budget runs out and the client reports the cancellation as an error: no further attempt."""
    calls: list[int] = []

    async def read() -> list[Any]:
        calls.append(1)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None
        return WHOLE

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await read_replies(read, attempts=3, widths=[2, 2])
    assert len(calls) == 1
