"""What a failed call says about the endpoint: its failure, the caller's, or neither.

A circuit breaker makes one judgement all day long. This module makes it for
the exceptions of the client libraries people call model endpoints with,
recognised by the module and name of their classes (never imported, so a
library the user does not use costs nothing), and for the status codes those
exceptions carry:

- the endpoint's failure (:attr:`Outcome.FAILURE`): connection errors,
  timeouts, 5xx, 408 (Ray Serve's "retry"), 424 (TGI's CUDA out-of-memory,
  SageMaker's ModelError with a 5xx from the container), 425, gRPC
  UNAVAILABLE / DEADLINE_EXCEEDED / INTERNAL / UNKNOWN / ABORTED / DATA_LOSS;
- the endpoint busy, not failing (:attr:`Outcome.OVERLOAD`): 429 (TGI's
  "Model is overloaded", a hosted API's rate limit), a 503 (or gRPC
  UNAVAILABLE) whose answer says its queue is full (Triton's "Exceeds maximum
  queue size", Ray Serve's backpressure, vLLM's queue cap), gRPC
  RESOURCE_EXHAUSTED, SageMaker's and AWS's throttling, the SDKs' own
  "overloaded" classes. It shrinks an adaptive limit; without one it counts
  as a failure, as it always did;
- the caller's error (:attr:`Outcome.IGNORED`): other 4xx (bad input, auth,
  unknown model or route, payload too large), gRPC INVALID_ARGUMENT,
  NOT_FOUND, PERMISSION_DENIED, ... , a URL or a credential that cannot work;
- a bug in the caller's own code (:attr:`Outcome.IGNORED` too): ``NameError``,
  ``ImportError``, ``SyntaxError``, ``NotImplementedError`` wherever raised, and
  ``TypeError`` / ``AttributeError`` raised by the caller's own code (the
  traceback's last frame outside the standard library, site-packages and
  cbtasks), not by a client library reading an odd answer: a bug is not an
  outage, and the task fails with its traceback instead of opening the circuit
  for everyone (``classify=`` can say otherwise);
- ``None``: the defaults do not know the exception; the policy's
  ``failure_exceptions`` decide (by default every ``Exception`` counts).

:func:`retry_hint` reads the endpoint's own "not before" from the same
exception: ``Retry-After`` (seconds or an HTTP date), ``retry-after-ms``
(OpenAI-compatible servers) and ``grpc-retry-pushback-ms``.

A user's rule composes with these: ``classify=`` (on a breaker, a policy or a
task) is called first, and whatever it returns ``None`` for is judged here.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from ._errors import CallerError, CallRefused, EndpointBusy, EndpointFailure
from ._state import Outcome

__all__ = [
    "Classifier",
    "default_classify",
    "failure_text",
    "http_status_outcome",
    "is_own_bug",
    "retry_hint",
]

log = logging.getLogger("cbtasks")

#: A user's rule: an Outcome for the exceptions it knows, None for the rest.
Classifier = Callable[[BaseException], Outcome | None]

FAILURE = Outcome.FAILURE
CALLER = Outcome.IGNORED
BUSY = Outcome.OVERLOAD

# 4xx that are the endpoint saying "not now" rather than "not this request".
# 408: the server gave up waiting (Ray Serve, nginx); 424: a dependency of the
# request failed (TGI's generation error, a CUDA OOM; SageMaker's ModelError);
# 425: too early (a replay during a TLS handshake). 429 (too many requests) is
# the endpoint busy: BUSY.
_ENDPOINT_4XX = frozenset({408, 424, 425})

_GRPC_FAILURES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "ABORTED", "DATA_LOSS"}
)

# What a 503 (or gRPC UNAVAILABLE) says when the server is up and its queue is
# full: Triton's "Exceeds maximum queue size" (src/scheduler_utils.cc), Ray
# Serve's "Request dropped due to backpressure" (serve/exceptions.py,
# BackPressureError), vLLM's and TGI's "overloaded", a proxy's "too many".
BUSY_WORDS = re.compile(
    r"overloaded|maximum queue size|queue (?:is )?full|backpressure|too many requests"
    r"|max_queued_requests|server is busy|at capacity",
    re.IGNORECASE,
)

# A status the class carries: read it (see _status_outcome).
_STATUS = "status"

# (top-level package, class name) -> outcome, or _STATUS to read the status
# the exception carries. The first class of the exception's MRO found here
# decides, so a library's subclass can override its base's rule.
_BY_CLASS: dict[tuple[str, str], Outcome | str] = {
    ("builtins", "TimeoutError"): FAILURE,
    ("builtins", "ConnectionError"): FAILURE,
    # httpx, and httpx2 (the fork the openai SDK ships on)
    **{
        (package, name): outcome
        for package in ("httpx", "httpx2")
        for name, outcome in dict[str, Outcome | str](
            HTTPStatusError=_STATUS,
            TimeoutException=FAILURE,
            NetworkError=FAILURE,
            RemoteProtocolError=FAILURE,
            ProxyError=FAILURE,
            DecodingError=FAILURE,
            UnsupportedProtocol=CALLER,
            LocalProtocolError=CALLER,
            InvalidURL=CALLER,
            TooManyRedirects=CALLER,
        ).items()
    },
    # requests (and huggingface_hub's errors, which subclass its HTTPError)
    ("requests", "HTTPError"): _STATUS,
    ("requests", "ConnectionError"): FAILURE,
    ("requests", "Timeout"): FAILURE,
    ("requests", "ChunkedEncodingError"): FAILURE,
    ("requests", "ContentDecodingError"): FAILURE,
    ("requests", "URLRequired"): CALLER,
    ("requests", "MissingSchema"): CALLER,
    ("requests", "InvalidSchema"): CALLER,
    ("requests", "InvalidURL"): CALLER,
    ("requests", "InvalidHeader"): CALLER,
    ("urllib3", "TimeoutError"): FAILURE,
    ("urllib3", "ProtocolError"): FAILURE,
    ("urllib3", "NewConnectionError"): FAILURE,
    ("urllib3", "MaxRetryError"): FAILURE,
    ("urllib", "HTTPError"): _STATUS,
    ("urllib", "URLError"): FAILURE,
    # aiohttp
    ("aiohttp", "ClientResponseError"): _STATUS,
    ("aiohttp", "ClientConnectionError"): FAILURE,
    ("aiohttp", "ClientPayloadError"): FAILURE,
    ("aiohttp", "InvalidURL"): CALLER,
    # grpc: RpcError carries code(); grpc.aio's AioRpcError too
    ("grpc", "RpcError"): _STATUS,
    # openai: APIStatusError carries status_code; connection and timeout errors
    ("openai", "APIStatusError"): _STATUS,
    ("openai", "APIConnectionError"): FAILURE,
    ("openai", "APIResponseValidationError"): FAILURE,
    # tritonclient (http and grpc): InferenceServerException carries status()
    ("tritonclient", "InferenceServerException"): _STATUS,
    # botocore: ClientError carries the error code and the HTTP status
    ("botocore", "ClientError"): _STATUS,
    ("botocore", "ConnectionError"): FAILURE,
    ("botocore", "HTTPClientError"): FAILURE,
    ("botocore", "ConnectionClosedError"): FAILURE,
    ("botocore", "ReadTimeoutError"): FAILURE,
    ("botocore", "ConnectTimeoutError"): FAILURE,
    ("botocore", "EndpointConnectionError"): FAILURE,
    ("botocore", "NoCredentialsError"): CALLER,
    ("botocore", "PartialCredentialsError"): CALLER,
    ("botocore", "NoRegionError"): CALLER,
    ("botocore", "ParamValidationError"): CALLER,
    ("botocore", "UnknownServiceError"): CALLER,
    # huggingface_hub: TGI's typed errors (by error_type), timeouts, HTTP errors
    ("huggingface_hub", "ValidationError"): CALLER,
    ("huggingface_hub", "GenerationError"): FAILURE,
    ("huggingface_hub", "OverloadedError"): BUSY,
    ("huggingface_hub", "IncompleteGenerationError"): FAILURE,
    ("huggingface_hub", "UnknownError"): FAILURE,
    ("huggingface_hub", "InferenceTimeoutError"): FAILURE,
    ("huggingface_hub", "HfHubHTTPError"): _STATUS,
    # text-generation (TGI's own client): classes by error_type and status
    ("text_generation", "ValidationError"): CALLER,
    ("text_generation", "BadRequestError"): CALLER,
    ("text_generation", "NotFoundError"): CALLER,
    ("text_generation", "NotSupportedError"): CALLER,
    ("text_generation", "GenerationError"): FAILURE,
    ("text_generation", "OverloadedError"): BUSY,
    ("text_generation", "IncompleteGenerationError"): FAILURE,
    ("text_generation", "ShardNotReadyError"): FAILURE,
    ("text_generation", "ShardTimeoutError"): FAILURE,
    ("text_generation", "RateLimitExceededError"): BUSY,
    ("text_generation", "UnknownError"): FAILURE,
    # Ray Serve's handle: max_ongoing_requests + max_queued_requests reached
    ("ray", "BackPressureError"): BUSY,
}

# botocore error codes that say the service (not the request) is in trouble,
# whatever the HTTP status (SageMaker's ModelNotReadyException is a 429).
_BOTO_FAILURE_CODES = frozenset(
    {
        "InternalFailure",
        "InternalDependencyException",
        "InternalServerError",
        "InternalServerException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ModelNotReadyException",
    }
)
# ... and those that say it is busy: throttled, not failing.
_BOTO_BUSY_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)

# Triton answers 400 for its UNKNOWN errors too (http_server.cc,
# HttpCodeFromError: UNKNOWN, INVALID_ARG, ALREADY_EXISTS, CANCELLED -> 400),
# and a backend's device failure arrives that way. Only the message tells:
# these words are an endpoint's trouble, never a caller's bad request.
_TRITON_ENDPOINT_WORDS = re.compile(
    r"out of memory|CUDA|cudaError|failed to allocate|stub process|exited unexpectedly"
    r"|is not ready|not healthy",
    re.IGNORECASE,
)


# "not ready" in a 4xx answer is the server's state, not the request's fault
# (MLServer's ModelNotReady is a 400: mlserver/errors.py).
NOT_READY_WORDS = re.compile(r"\bnot ready\b|\bis loading\b|\bnot loaded yet\b", re.IGNORECASE)


def http_status_outcome(status: int, text: str = "") -> Outcome | None:
    """The outcome an HTTP status means: FAILURE, OVERLOAD (busy: 429, or a 503 whose
    ``text`` says its queue is full), IGNORED (the caller's), or None (2xx/3xx)."""
    if status == 429 or (status == 503 and BUSY_WORDS.search(text)):
        return BUSY
    if status >= 500 or status in _ENDPOINT_4XX:
        return FAILURE
    if status >= 400:
        return CALLER
    return None


def grpc_code_outcome(code_name: str, details: str = "") -> Outcome | None:
    """The outcome a gRPC status code (by name, "UNAVAILABLE") means; None for OK.

    RESOURCE_EXHAUSTED, and UNAVAILABLE whose ``details`` say the queue is full
    (Triton's gRPC answer past ``max_queue_size``), are the endpoint busy.
    """
    if code_name == "RESOURCE_EXHAUSTED" or (
        code_name == "UNAVAILABLE" and BUSY_WORDS.search(details)
    ):
        return BUSY
    if code_name in _GRPC_FAILURES:
        return FAILURE
    return None if code_name == "OK" else CALLER


def triton_outcome(status: int, message: str) -> Outcome | None:
    """A Triton HTTP answer: its status, with a 400 that names device trouble the endpoint's."""
    if status == 400 and _TRITON_ENDPOINT_WORDS.search(message):
        return FAILURE
    return http_status_outcome(status, message)


def default_classify(exc: BaseException) -> Outcome | None:
    """The defaults' judgement of ``exc``; None when they do not know it.

    Knows cbtasks' own :class:`CallerError` and :class:`EndpointFailure`, the
    exceptions of httpx, requests, urllib, aiohttp, grpc, openai, tritonclient,
    botocore, huggingface_hub and text-generation, Python's own timeouts and
    connection errors, and any exception that carries an HTTP status
    (``status_code``, or ``response.status_code``).
    """
    if isinstance(exc, CallerError):
        return CALLER
    if isinstance(exc, EndpointBusy):
        return BUSY
    if isinstance(exc, EndpointFailure):
        return FAILURE
    for cls in type(exc).__mro__:
        rule = _BY_CLASS.get((cls.__module__.partition(".")[0], cls.__name__))
        if rule is None:
            continue
        if rule == _STATUS:
            return _unless_not_ready(exc, _status_outcome(exc))
        assert isinstance(rule, Outcome)
        return rule
    status = _http_status(exc)
    if status is None:
        return None
    return _unless_not_ready(exc, http_status_outcome(status, _answer_text(exc)))


def _unless_not_ready(exc: BaseException, outcome: Outcome | None) -> Outcome | None:
    """A caller's error whose answer says the model is not ready is the endpoint's."""
    if outcome is not CALLER:
        return outcome
    return FAILURE if NOT_READY_WORDS.search(_answer_text(exc)) else CALLER


def _answer_text(exc: BaseException) -> str:
    """What the exception and the answer it carries say, for the words rules read."""
    texts = [str(exc)[:2000]]
    response = getattr(exc, "response", None)
    try:
        text = getattr(response, "text", None)  # httpx raises if the body was never read
    except Exception:
        text = None
    if isinstance(text, str):
        texts.append(text[:2000])
    return "\n".join(texts)


def _status_outcome(exc: BaseException) -> Outcome | None:
    """The outcome of an exception whose class carries a status of its library's kind."""
    module = type(exc).__module__.partition(".")[0]
    if module == "botocore":
        return _botocore_outcome(getattr(exc, "response", None))
    if module == "tritonclient":
        status = _call(exc, "status")
        message = str(_call(exc, "message") or "")
        if isinstance(status, str) and status.startswith("StatusCode."):
            return grpc_code_outcome(status.removeprefix("StatusCode."), message)
        if isinstance(status, str) and status.isdigit():
            return triton_outcome(int(status), message)
        # No status: the client could not reach the server, or read its answer.
        return FAILURE
    if module == "grpc":
        code_name = getattr(_call(exc, "code"), "name", None)  # a grpc.StatusCode
        details = str(_call(exc, "details") or "")
        return grpc_code_outcome(code_name, details) if isinstance(code_name, str) else FAILURE
    status = _http_status(exc)
    # An HTTP error class without a status never reached an answer.
    return FAILURE if status is None else http_status_outcome(status, _answer_text(exc))


def _botocore_outcome(response: object) -> Outcome | None:
    if not isinstance(response, Mapping):
        return FAILURE
    error = response.get("Error") or {}
    code = error.get("Code") if isinstance(error, Mapping) else None
    if code == "ModelError":
        # SageMaker: the model container answered; its own status decides.
        original = _as_int(response.get("OriginalStatusCode"))
        return FAILURE if original is None else http_status_outcome(original) or FAILURE
    if code in _BOTO_BUSY_CODES:
        return BUSY
    if code in _BOTO_FAILURE_CODES:
        return FAILURE
    metadata = response.get("ResponseMetadata") or {}
    status = _as_int(metadata.get("HTTPStatusCode")) if isinstance(metadata, Mapping) else None
    return FAILURE if status is None else http_status_outcome(status)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if any (its own or its response's)."""
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None:
            continue
        for attribute in ("status_code", "status"):
            status = _as_int(getattr(holder, attribute, None))
            if status is not None and 100 <= status <= 599:
                return status
    return None


def retry_hint(exc: BaseException) -> float | None:
    """Seconds the endpoint asked callers to wait, read from ``exc``; None if it did not say.

    ``exc.retry_after`` (cbtasks' :class:`EndpointFailure`), else the headers
    of the answer the exception carries (``Retry-After`` in seconds or as an
    HTTP date, ``retry-after-ms``) or a gRPC call's trailing metadata
    (``grpc-retry-pushback-ms``, ``retry-after``). The breaker bounds it.
    """
    if isinstance(exc, CallRefused):
        return None  # our own rejection's wait, not the endpoint's word
    own = getattr(exc, "retry_after", None)
    if isinstance(own, int | float) and not isinstance(own, bool) and math.isfinite(own):
        return max(0.0, float(own))
    return headers_retry_hint(_headers_of(exc))


def headers_retry_hint(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from an answer's headers (names lowercased); None if they do not say."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("grpc-retry-pushback-ms", 0.001)):
        value = _as_float(headers.get(name))
        if value is not None and value >= 0:  # a negative pushback means "do not retry"
            return value * scale
    return parse_retry_after(headers.get("retry-after"))


def _headers_of(exc: BaseException) -> dict[str, str]:
    """The answer's headers (or gRPC trailers) an exception carries, names lowercased."""
    pairs: Iterable[Any] = ()
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):  # botocore's parsed response
        metadata = response.get("ResponseMetadata")
        if isinstance(metadata, Mapping):
            pairs = _items(metadata.get("HTTPHeaders"))
    elif response is not None:
        pairs = _items(getattr(response, "headers", None))
    if not pairs:
        pairs = _items(getattr(exc, "headers", None))  # aiohttp's ClientResponseError
    if not pairs and type(exc).__module__.startswith("grpc"):
        trailers = _call(exc, "trailing_metadata")
        pairs = trailers if isinstance(trailers, tuple | list) else ()
    headers: dict[str, str] = {}
    for pair in pairs:
        if isinstance(pair, tuple | list) and len(pair) == 2:
            key, value = pair
            if isinstance(key, str) and isinstance(value, str | bytes):
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                headers[key.lower()] = text
    return headers


def _items(headers: object) -> Iterable[Any]:
    items = getattr(headers, "items", None)
    if not callable(items):
        return ()
    try:
        return list(items())
    except Exception:  # a header object we cannot read: no hint
        return ()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    seconds = _as_float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _call(obj: object, method: str) -> Any:
    """``obj.method()`` when it is a method that answers; None otherwise."""
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # a half-built exception object: it tells us nothing
        return None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# Raised by a bug, whoever raised it: never an endpoint's outage.
_BUGS = (NameError, ImportError, SyntaxError, NotImplementedError)
# A bug when the caller's own code raised it; from a library (a client reading an odd
# answer) it may be the endpoint's doing.
_BUGS_IF_OWN = (TypeError, AttributeError)
# Where libraries live: the standard library, site-packages, and cbtasks itself.
_LIBRARY_ROOTS = tuple(
    {
        os.path.realpath(path) + os.sep
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (path := sysconfig.get_paths().get(key))
    }
    | {os.path.dirname(os.path.realpath(__file__)) + os.sep}
)


def is_own_bug(exc: BaseException) -> bool:
    """True for an exception that says the caller's code is wrong, not the endpoint down.

    ``NameError`` (and ``UnboundLocalError``), ``ImportError``, ``SyntaxError`` and
    ``NotImplementedError`` always; ``TypeError`` and ``AttributeError`` when the
    last frame of their traceback is the caller's own code, not a library's.
    """
    if isinstance(exc, _BUGS):
        return True
    if not isinstance(exc, _BUGS_IF_OWN):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False  # made, never raised: nothing says whose code it was
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if filename.startswith("<") or "site-packages" in filename or "dist-packages" in filename:
        return False
    return not os.path.realpath(filename).startswith(_LIBRARY_ROOTS)


#: A failure as operators read it is one line of at most this many characters.
FAILURE_TEXT_CHARACTERS = 200
# What must never reach a log or Redis: a URL's user:password, a bearer token, and
# key=value pairs whose key says secret.
_CREDENTIALS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.IGNORECASE), r"\1***@"),
    (re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1 ***"),
    (
        re.compile(
            r"\b(api[_-]?key|access[_-]?token|token|password|passwd|secret)([\"']?\s*[=:]\s*[\"']?)"
            r"[^\s\"'&,;]+",
            re.IGNORECASE,
        ),
        r"\1\2***",
    ),
)


def failure_text(exc: BaseException) -> str:
    """What a failed call raised, in one short line for logs and operators:
    ``"ConnectError: [Errno 111] Connection refused"``, never a credential."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    if len(text) > FAILURE_TEXT_CHARACTERS:
        text = text[: FAILURE_TEXT_CHARACTERS - 3] + "..."
    return text


def judge(
    exc: BaseException,
    hooks: tuple[Classifier, ...],
    ignored: tuple[type[BaseException], ...],
    failures: tuple[type[BaseException], ...],
) -> Outcome:
    """The outcome a breaker records for ``exc``: the user's rules first, then the defaults.

    ``hooks`` (the breaker's ``classify``, then the policy's) are asked in
    turn; the first that returns an Outcome decides. Then ``ignored`` (the
    policy's ``ignored_exceptions``, added to the defaults) and bugs of the
    caller's own code (:func:`is_own_bug`) are the caller's;
    then :func:`default_classify`; an exception outside ``failures`` (the
    policy's ``failure_exceptions``) is never a failure: the endpoint answered.
    The endpoint saying it is busy (OVERLOAD) stays so.
    """
    for hook in hooks:
        try:
            outcome = hook(exc)
        except Exception:
            log.exception("classify hook %r failed on %r: the defaults decide", hook, exc)
            continue
        if outcome is None:
            continue
        if isinstance(outcome, Outcome):
            return outcome
        log.error(
            "classify hook %r returned %r for %r: return an Outcome or None (the defaults decide)",
            hook,
            outcome,
            exc,
        )
    if isinstance(exc, ignored) or is_own_bug(exc):
        return CALLER
    outcome = default_classify(exc)
    if outcome is CALLER or outcome is BUSY:
        return outcome
    if not isinstance(exc, failures):
        return Outcome.SUCCESS if isinstance(exc, Exception) else CALLER
    return FAILURE
