"""Client for the jobs website API (docs/reference.md#jobs-website): fetch active job requests, push job statuses.

The wire format itself (parsing requests, encoding jobs, batching) is wire.py's; the
retries and timeouts bound to the overall time limit are http.py's.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jobrunner_lib import __version__
from jobrunner_lib.core.errors import ConfigError, JrError, TemporaryFailure
from jobrunner_lib.core.flags import Flag
from jobrunner_lib.website.http import _deadline_classes
from jobrunner_lib.website.wire import (
    MalformedRequest,
    flags_header,
    group_contiguously,
    malformed_request,
    parse_job_request,
)

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

JOB_REQUESTS_PATH = "job-requests/"
JOBS_PATH = "jobs/"
RETRY_STATUSES = frozenset({500, 502, 503, 504})
MASK = "********"
# How long past its deadline a call may take to finish by itself before it is abandoned.
DEADLINE_GRACE = 0.5


# The exceptions are JrErrors, so tools map them to exit codes (docs/architecture.md#errors-and-exit-codes) without extra code:
# auth -> 78 (ConfigError), unavailable -> 75 (TemporaryFailure), anything else -> 1.
class JobServerError(JrError):
    """Any failure talking to the jobs website."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class JobServerAuthError(JobServerError, ConfigError):
    """The website refused the token (401/403): a configuration error."""


class JobServerMisconfigured(JobServerError, ConfigError):
    """JOB_SERVER_ENDPOINT does not lead to the API (404, a redirect, TLS against plain HTTP)."""


class JobServerUnavailable(JobServerError, TemporaryFailure):
    """Unreachable, timed out, 5xx after retries, or over the overall time limit: retry later."""


class JobServerBadResponse(JobServerError):
    """The website answered with a body that is not JSON or not the expected shape."""


class JobServerRejected(JobServerError):
    """The website rejected a POST with 400; `errors` holds its parsed error list."""

    def __init__(self, message: str, errors: list[Any], *, status_code: int = 400) -> None:
        super().__init__(message, status_code=status_code)
        self.errors = errors


class _BareTokenAuth:
    """Send the bare token (docs/reference.md#jobs-website); as session auth it also stops requests using ~/.netrc."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = self._token
        return request

    def __repr__(self) -> str:
        return f"_BareTokenAuth({MASK})"


class JobServerClient:
    """A thin client for the jobs website API; one instance per thread."""

    def __init__(
        self,
        endpoint: str,
        token: str,
        backend: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        total_limit: float = 60.0,
        retries: int = 3,
        backoff_factor: float = 0.5,
        user_agent: str | None = None,
        flags: Callable[[], Iterable[Flag]] | None = None,
    ) -> None:
        """flags: what the caller's state store holds, read afresh for every call and sent as the
        `Flags` header (docs/reference.md#backend-flags); None sends no header."""
        # An empty token makes today's server return every backend's work (docs/reference.md#jobs-website).
        if not isinstance(token, str) or not token.strip():
            raise ValueError("JOB_SERVER_TOKEN is empty; refusing to talk to the jobs website")
        # A stray CR or space from an edited .env would otherwise surface as a 403 or as an
        # InvalidHeader error that quotes the token.
        if token != token.strip() or not token.isascii() or not token.isprintable():
            raise ValueError(
                "JOB_SERVER_TOKEN contains whitespace, control or non-ASCII characters"
            )
        self._token = token
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"JOB_SERVER_ENDPOINT must be an http(s) URL, got {self._mask(endpoint)!r}"
            )
        if min(connect_timeout, read_timeout, total_limit) <= 0:
            raise ValueError("connect_timeout, read_timeout and total_limit must be positive")
        self.endpoint = endpoint if endpoint.endswith("/") else endpoint + "/"
        self.backend = backend
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.total_limit = float(total_limit)
        self.retries = int(retries)
        self.backoff_factor = float(backoff_factor)
        self.flags = flags

        import requests

        self._requests = requests
        self._user_agent = user_agent or f"jr/{__version__}"
        self._session, self._adapter = self._new_session()

    def _new_session(self) -> tuple[Any, Any]:
        from requests.adapters import HTTPAdapter

        session = self._requests.Session()
        session.auth = _BareTokenAuth(self._token)
        session.headers.update({"Accept": "application/json", "User-Agent": self._user_agent})
        adapter = HTTPAdapter(max_retries=self._retry(None))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session, adapter

    def __enter__(self) -> JobServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session and its pooled connections."""
        self._session.close()

    # ------------------------------------------------------------ public calls

    def fetch_job_requests(self) -> tuple[list[dict], list[str]]:
        """Fetch every page of active job requests: (parsed requests, problems with bad ones)."""
        deadline = time.monotonic() + self.total_limit
        url: str | None = self._url(JOB_REQUESTS_PATH, {"backend": self.backend})
        offset, pages, index = 0, 0, 0
        found: list[dict] = []
        problems: list[str] = []
        seen: set[str] = set()
        while url is not None:
            response = self._request("GET", url, deadline)
            self._check_status(response, "GET", url)
            body = self._json(response, "GET", url)
            if not isinstance(body, dict) or not isinstance(body.get("results"), list):
                raise JobServerBadResponse(
                    f"GET {self._display(url)}: expected an object with a 'results' list, "
                    f"got {self._snippet(response)}"
                )
            pages += 1
            for obj in body["results"]:
                try:
                    parsed = parse_job_request(obj)
                except MalformedRequest as exc:
                    # Answered on the website (an __error__ job saying why), not skipped.
                    parsed = malformed_request(exc, obj)
                except ValueError as exc:  # no usable identifier: nothing can answer it
                    problems.append(self._mask(f"request {_label(obj, index)}: {exc}"))
                    index += 1
                    continue
                # Offset paging shifts when a newer request arrives between pages, so the
                # same request can show up twice; the first sighting wins.
                if parsed["id"] not in seen:
                    seen.add(parsed["id"])
                    found.append(parsed)
                index += 1
            url, offset = self._next_page(body.get("next"), offset, url)
        log.debug(
            "fetched %d job requests in %d pages (%d malformed)", len(found), pages, len(problems)
        )
        return found, problems

    def post_jobs(self, jobs: list[dict], *, batch_size: int = 200) -> None:
        """POST wire-format jobs (see job_to_wire) in batches that never split a request."""
        batches = group_contiguously(jobs, batch_size)
        deadline = time.monotonic() + self.total_limit
        url = self._url(JOBS_PATH)
        for batch in batches:
            body = json.dumps(batch).encode()
            response = self._request("POST", url, deadline, body=body, count=len(batch))
            if response.status_code == 400:
                raise self._rejected(response, url, batch)
            self._check_status(response, "POST", url)
            self._json(response, "POST", url)

    # ------------------------------------------------------------ internals

    def _retry(self, deadline: float | None) -> Any:
        retry_class, _ = _deadline_classes()
        retry = retry_class(
            total=self.retries,
            backoff_factor=self.backoff_factor,
            status_forcelist=RETRY_STATUSES,
            # Posting statuses is idempotent (an upsert by identifier), so POST is safe to repeat.
            allowed_methods=frozenset({"GET", "POST"}),
            # Hand back the last 5xx response so the error can name its status.
            raise_on_status=False,
        )
        retry.deadline = deadline
        return retry

    def _request(
        self,
        method: str,
        url: str,
        deadline: float,
        *,
        body: bytes | None = None,
        count: int | None = None,
    ) -> requests.Response:
        left = deadline - time.monotonic()
        shown = self._display(url)
        if left <= 0:
            raise JobServerUnavailable(
                f"{method} {shown}: gave up, over the {self.total_limit:g}s time limit"
            )
        _, timeout_class = _deadline_classes()
        timeout = timeout_class(
            connect=min(self.connect_timeout, left), read=min(self.read_timeout, left)
        )
        timeout.deadline = deadline
        # Swapped per call so urllib3's own retries see this call's deadline (hence one
        # client per thread).
        self._adapter.max_retries = self._retry(deadline)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.flags is not None:
            # Upstream sends its flags on every call; the website stores them as the backend's
            # state on each authenticated GET job-requests/ and POST jobs/ (its status pages
            # read them).
            headers["Flags"] = flags_header(self.flags())
        jobs = f" ({count} jobs)" if count is not None else ""
        started = time.monotonic()
        exceptions = self._requests.exceptions
        try:
            response = self._within(
                deadline,
                f"{method} {shown}{jobs}",
                lambda: self._session.request(
                    method, url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                ),
            )
        except (exceptions.InvalidURL, exceptions.InvalidSchema, exceptions.InvalidHeader) as exc:
            raise JobServerError(self._mask(f"{method} {shown}{jobs}: {_describe(exc)}")) from None
        except exceptions.SSLError as exc:
            # Not a passing fault: an https URL for a plain-HTTP server, or a certificate this
            # host does not trust. Retrying every pass would only hide it.
            raise JobServerMisconfigured(
                self._mask(
                    f"{method} {shown}{jobs}: TLS failed ({_describe(exc)}); check "
                    "JOB_SERVER_ENDPOINT (http or https?) and the server's certificate"
                )
            ) from None
        except exceptions.RequestException as exc:
            elapsed = time.monotonic() - started
            message = self._mask(
                f"{method} {shown}{jobs} failed after {elapsed:.1f}s: {_describe(exc)}"
            )
            log.debug("%s", message)
            # from None: the chained requests error could carry the URL's credentials
            raise JobServerUnavailable(message) from None
        elapsed = time.monotonic() - started
        log.debug("%s %s%s -> %d in %.2fs", method, shown, jobs, response.status_code, elapsed)
        return response

    def _within(self, deadline: float, what: str, call: Callable[[], Any]) -> Any:
        """call() (connect, headers and the whole body), given up at the deadline.

        Socket timeouts alone cannot do it: each one bounds a single wait, so a server that
        sends a byte every few seconds keeps a call going for ever. The call runs in a thread
        that is abandoned at the deadline (with the session it used: later calls get a new
        one); jr-sync exits after its pass, which ends the thread.
        """
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["response"] = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="jobs website call", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE)
        if thread.is_alive():
            stuck = self._session
            self._session, self._adapter = self._new_session()
            stuck.close()
            raise JobServerUnavailable(
                f"{what}: no complete answer within the {self.total_limit:g}s time limit "
                "(the jobs website is slow or stalled)"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome["response"]

    def _check_status(self, response: requests.Response, method: str, url: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        where = f"{method} {self._display(url)}"
        if status in (401, 403):
            detail = _detail(response)
            raise JobServerAuthError(
                self._mask(
                    f"{where}: the jobs website refused the token ({status}"
                    f"{': ' + detail if detail else ''}); check JOB_SERVER_TOKEN"
                ),
                status_code=status,
            )
        if status >= 500:
            # It answers, so it is reachable: the website itself is failing (temporary for us).
            raise JobServerUnavailable(
                f"{where}: the jobs website is erroring: it answered {status} "
                f"(after up to {self.retries} retries): {self._snippet(response)}",
                status_code=status,
            )
        if 300 <= status < 400:
            location = self._display(response.headers.get("Location", "?"))
            raise JobServerMisconfigured(
                f"{where}: redirected ({status}) to {location}; check JOB_SERVER_ENDPOINT",
                status_code=status,
            )
        if status == 404:
            raise JobServerMisconfigured(
                f"{where}: not found (404): {self._snippet(response)}; check JOB_SERVER_ENDPOINT "
                "(the API's base URL, e.g. https://jobs.opensafely.org/api/v2/)",
                status_code=status,
            )
        raise JobServerError(
            f"{where}: unexpected {status}: {self._snippet(response)}", status_code=status
        )

    def _json(self, response: requests.Response, method: str, url: str) -> Any:
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            raise JobServerBadResponse(
                f"{method} {self._display(url)}: {response.status_code} with a body that is not "
                f"JSON: {self._snippet(response)}",
                status_code=response.status_code,
            ) from None

    def _rejected(self, response: requests.Response, url: str, batch: list[dict]) -> Exception:
        try:
            parsed = json.loads(response.content)
        except ValueError:
            parsed = [response.text]
        errors = parsed if isinstance(parsed, list) else [parsed]
        items: list[str] = []
        if len(errors) == len(batch) and all(isinstance(e, dict) for e in errors):
            for job, error in zip(batch, errors, strict=True):
                if error:
                    fields = "; ".join(f"{k}: {_flatten(v)}" for k, v in error.items())
                    items.append(
                        f"job {job.get('identifier')} ({job.get('job_request_id')}) {fields}"
                    )
        else:
            items = [_flatten(e) for e in errors]
        more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
        message = (
            f"POST {self._display(url)}: the jobs website rejected {len(batch)} jobs: "
            + " | ".join(items[:5])
            + more
        )
        return JobServerRejected(self._mask(message), errors)

    def _next_page(self, link: Any, offset: int, current: str) -> tuple[str | None, int]:
        if link is None:
            return None, offset
        if not isinstance(link, str):
            raise JobServerBadResponse(f"GET {self._display(current)}: 'next' is not a URL")
        # Only the paging parameters of `next` are used, on our own endpoint: the link carries
        # the server's idea of its own host (wrong behind a proxy), and following it verbatim
        # would send the token wherever a body pointed.
        params = dict(parse_qsl(urlsplit(link).query))
        try:
            next_offset = int(params.get("offset", "0"))
        except ValueError:
            raise JobServerBadResponse(f"GET {self._display(current)}: bad 'next' link") from None
        if next_offset <= offset:
            raise JobServerBadResponse(
                f"GET {self._display(current)}: 'next' link does not advance (offset {next_offset})"
            )
        params["backend"] = self.backend
        return self._url(JOB_REQUESTS_PATH, params), next_offset

    def _url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        url = self.endpoint + path
        return f"{url}?{urlencode(params)}" if params else url

    def _mask(self, text: str) -> str:
        for secret in (self._token, repr(self._token)[1:-1]):
            text = text.replace(secret, MASK)
        return text

    def _display(self, url: str) -> str:
        # Userinfo in the endpoint is a credential too; never show it.
        parts = urlsplit(url)
        if "@" in parts.netloc:
            parts = parts._replace(netloc=MASK + "@" + parts.netloc.rsplit("@", 1)[1])
        return self._mask(urlunsplit(parts))

    def _snippet(self, response: requests.Response) -> str:
        text = " ".join(response.text[:200].split())
        return self._mask(repr(text) if text else "an empty body")


def _label(obj: Any, index: int) -> str:
    """How a problem names a request: its identifier (escaped, cut short) or its position."""
    if isinstance(obj, dict):
        identifier = obj.get("identifier")
        if isinstance(identifier, (str, int)) and not isinstance(identifier, bool):
            # A problem is one log line: no control characters, nothing huge from the body.
            text = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(identifier))
            if text:
                return text if len(text) <= 64 else f"{text[:61]}..."
    return f"#{index}"


_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]")


def _describe(exc: BaseException) -> str:
    # requests wraps urllib3's MaxRetryError, which wraps the real cause: name that instead.
    reason: Any = getattr(exc.args[0] if exc.args else None, "reason", None) or exc
    if len(reason.args) > 1 and isinstance(reason.args[1], BaseException):
        reason = reason.args[1]  # ProtocolError("Connection aborted.", ConnectionResetError(...))
    return f"{type(reason).__name__}: {reason}"


def _flatten(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in value.items())
    return str(value)


def _detail(response: requests.Response) -> str:
    try:
        body = json.loads(response.content)
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else ""
