"""Which failures the runtime waits out, and for how long.

Infrastructure that is down or not ready comes back: the S3 server refusing connections or answering
5xx, a Kafka broker restarting or a partition without a leader. Those errors back off exponentially with
full jitter (replicas that failed together do not retry together) for a window, five minutes by default,
before anyone gives up. Any other error may be the event's own (a phase raising): a few quick attempts.
An error no retry can fix (a BadEvent: digest mismatch, unknown schema; a missing object) gets none and
goes to the dead-letter topic at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import urllib3
from aiokafka.errors import KafkaError, KafkaTimeoutError
from minio.error import S3Error, ServerError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from shared.fabric.events import BadEvent
from shared.fabric.storage import MissingObject
from shared.phase import PhaseCancelled

log = logging.getLogger(__name__)

_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}


def is_transient(error: BaseException) -> bool:
    """Infrastructure unavailable for now, not anything about the event."""
    if isinstance(error, (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError, ServerError)):
        return True
    if isinstance(error, S3Error):
        return error.code in _TRANSIENT_S3_CODES or (error.response is not None and error.response.status >= 500)
    if isinstance(error, KafkaError):
        return bool(error.retriable) or isinstance(error, KafkaTimeoutError)
    return False


def is_permanent(error: BaseException) -> bool:
    """No retry can fix it."""
    return isinstance(error, (BadEvent, MissingObject, PhaseCancelled))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # for an error that is neither transient nor permanent
    initial_s: float = 1.0
    max_s: float = 30.0
    transient_window_s: float = 300.0

    def _stop(self, state: RetryCallState) -> bool:
        error = state.outcome.exception() if state.outcome else None
        if error is not None and is_transient(error):
            return state.seconds_since_start >= self.transient_window_s
        return state.attempt_number >= self.attempts

    def retrying(self, what: str) -> AsyncRetrying:
        """Attempts of `what` under this policy; the last error is re-raised when they run out."""
        return AsyncRetrying(
            stop=self._stop,
            wait=wait_random_exponential(multiplier=self.initial_s, max=self.max_s),
            retry=retry_if_exception(lambda error: isinstance(error, Exception) and not is_permanent(error)),
            before_sleep=lambda state: log.warning(
                "%s: attempt %d failed after %.0f s, retrying: %r", what, state.attempt_number,
                state.seconds_since_start, state.outcome.exception()),
            reraise=True,
        )
