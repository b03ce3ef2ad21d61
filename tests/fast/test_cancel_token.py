"""A call's cancel token: selectable, set once, and its eventfd reused only when it was
never set (a token costs no syscall per call)."""

from __future__ import annotations

import select

from toolq.workers.runtime.base import CancelToken


def ready(token: CancelToken) -> bool:
    return bool(select.select([token.fileno()], [], [], 0)[0])


def test_a_token_wakes_its_reader_once_cancelled() -> None:
    token = CancelToken()
    assert not token.cancelled and not ready(token)
    token.cancel()
    token.cancel()  # once is enough
    assert token.cancelled and ready(token)
    token.close()


def test_a_closed_token_never_sets_the_token_that_reuses_its_eventfd() -> None:
    first = CancelToken()
    fd = first.fileno()
    first.close()
    second = CancelToken()
    assert second.fileno() == fd  # reused: never set, as good as new
    first.cancel()  # a late cancel of a call that is over
    assert not second.cancelled and not ready(second)
    second.close()


def test_a_cancelled_tokens_eventfd_is_not_reused() -> None:
    first = CancelToken()
    first.cancel()
    first.close()
    second = CancelToken()  # its eventfd is a new one: the set counter went with the old
    assert not ready(second) and not second.cancelled
    second.close()
