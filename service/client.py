"""A thin client of the job API (httpx), for the ``byol submit`` / ``byol status`` commands
and for scripts. Every failure is a ByolError with a one-line message."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from byol_core.errors import ByolError

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRIED_STATUSES = frozenset({502, 503, 504})


class ApiError(ByolError):
    """The API answered with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class ApiUnreachable(ByolError):
    """No answer from the API (refused, timed out, not HTTP)."""


def default_url() -> str:
    return os.environ.get("BYOL_API_URL", DEFAULT_URL)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


class ApiClient:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiUnreachable(
                f"cannot reach the BYOL API at {self.url} ({exc}); is the server running? "
                "(set --url or BYOL_API_URL)"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiUnreachable(f"BYOL API at {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise ApiError(
                response.status_code,
                f"{method} {path}: HTTP {response.status_code}: {_detail(response)}",
            )
        return response

    def submit(
        self, spec: dict[str, Any], idempotency_key: str | None = None, attempts: int = 3
    ) -> dict[str, Any]:
        """Create a job. Transient failures are retried with the same Idempotency-Key, so a
        retry never creates a second job."""
        key = idempotency_key or str(uuid.uuid4())
        for attempt in range(1, attempts + 1):
            try:
                return self._request(
                    "POST", "/jobs", json=spec, headers={"Idempotency-Key": key}
                ).json()
            except (ApiUnreachable, ApiError) as exc:
                transient = isinstance(exc, ApiUnreachable) or (exc.status_code in RETRIED_STATUSES)
                if not transient or attempt == attempts:
                    raise
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def stream(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's events (dicts with at least ``status``) until it finishes."""
        path = f"/jobs/{job_id}/events"
        try:
            with self.http.stream("GET", path, timeout=httpx.Timeout(10.0, read=60.0)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiError(
                        resp.status_code, f"GET {path}: HTTP {resp.status_code}: {_detail(resp)}"
                    )
                yield from parse_events(resp.iter_lines())
        except httpx.ConnectError as exc:
            raise ApiUnreachable(f"cannot reach the BYOL API at {self.url} ({exc})") from None

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Follow the job until it finishes and return it. A dropped stream is reopened (its
        first event is the current state, so nothing is missed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                for event in self.stream(job_id):
                    if event.get("status") in TERMINAL:
                        return self.status(job_id)
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except (httpx.HTTPError, ApiUnreachable):
                time.sleep(1.0)
            if deadline is not None and time.monotonic() > deadline:
                raise ByolError(f"job {job_id} did not finish within {timeout:g} s")
            job = self.status(job_id)
            if job["status"] in TERMINAL:
                return job


def parse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events' JSON data; comments (keep-alive pings) and other fields skipped."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


# Module-level shortcuts: one request each, on a short-lived client.


def submit(
    spec: dict[str, Any],
    token: str | None,
    idempotency_key: str | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    with ApiClient(url, token) as client:
        return client.submit(spec, idempotency_key)


def status(job_id: str, url: str | None = None) -> dict[str, Any]:
    with ApiClient(url) as client:
        return client.status(job_id)


def stream(job_id: str, url: str | None = None) -> Iterator[dict[str, Any]]:
    with ApiClient(url) as client:
        yield from client.stream(job_id)


def wait(job_id: str, url: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    with ApiClient(url) as client:
        return client.wait(job_id, timeout)
