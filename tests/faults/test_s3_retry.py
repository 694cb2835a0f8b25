"""The storage retry policy (storage/retry.py) against a real HTTP server on loopback that answers as S3
does when it is throttled, failing or refusing: s3fs, botocore and aiohttp run unchanged in front of it.

Transient answers (503 SlowDown, 500, a refused connection, a server that never replies) are retried with
a visible line per wait and then end in StorageUnavailableError (exit 4); permanent ones (403, 404) come
back at once, as one request."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
from copgen.errors import StorageUnavailableError
from copgen.storage.retry import RetryConfigError, RetryPolicy, transient

BODY = b"thumbnail bytes"
ERROR_XML = "<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"


class ScriptedS3(http.server.ThreadingHTTPServer):
    """Answers each request with the next ``(status, code)`` of ``script``, then 200 (an S3 object)."""

    daemon_threads = True

    def __init__(self, script: list[tuple[int, str]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = list(script)
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def next_answer(self, method: str, path: str) -> tuple[int, str]:
        with self.lock:
            self.seen.append((method, path))
            return self.script.pop(0) if self.script else (200, "")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, head: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, code = self.server.next_answer(self.command, self.path)
        body = BODY if status == 200 and self.command in ("GET", "HEAD") else (
            b"" if status == 200 else ERROR_XML.format(code=code).encode())
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", "Tue, 01 Dec 2026 12:00:00 GMT")
        self.send_header("Content-Type", "application/xml" if status != 200 else "binary/octet-stream")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_PUT(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)


@pytest.fixture
def fast_policy(monkeypatch):
    """Short waits and timeouts, so the retries of a whole outage take well under a second."""
    monkeypatch.setenv("COPGEN_STORAGE_BACKOFF", "0.01")
    monkeypatch.setenv("COPGEN_STORAGE_BACKOFF_MAX", "0.05")
    monkeypatch.setenv("COPGEN_STORAGE_TIMEOUT", "1")
    monkeypatch.delenv("COPGEN_STORAGE_RETRIES", raising=False)


def _serve(script):
    server = ScriptedS3(script)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _fs(endpoint: str):
    import copgen.storage  # noqa: F401 - registers the retrying filesystem for s3://
    import fsspec

    fs, _ = fsspec.core.url_to_fs("s3://bkt/obj", key="testing", secret="testing", skip_instance_cache=True,
                                  client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    return fs


def _waits(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("waiting for ")]


def test_throttling_is_retried_visibly_and_then_succeeds(fast_policy, capsys):
    server = _serve([(503, "SlowDown"), (503, "SlowDown")])
    try:
        fs = _fs(f"http://127.0.0.1:{server.server_port}")
        assert type(fs).__name__ == "RetryingS3FileSystem"
        assert fs.cat_file("bkt/obj") == BODY
    finally:
        server.shutdown()
    waits = _waits(capsys.readouterr().err)
    assert [w.split(": ")[0] for w in waits] == ["waiting for s3://bkt/obj (attempt 1/8)",
                                                 "waiting for s3://bkt/obj (attempt 2/8)"]
    assert all("HTTP 503" in w and "testing" not in w for w in waits)  # a reason, never a credential
    assert len(server.seen) >= 3  # the two throttled requests were sent again


def test_a_failed_write_is_retried(fast_policy, capsys):
    server = _serve([(500, "InternalError")])
    try:
        fs = _fs(f"http://127.0.0.1:{server.server_port}")
        fs.pipe_file("bkt/cube/c/0", b"chunk")
    finally:
        server.shutdown()
    assert [m for m, _ in server.seen] == ["PUT", "PUT"]
    assert "waiting for s3://bkt/cube/c/0 (attempt 1/8): HTTP 500 InternalError" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "code", "error"), [(403, "AccessDenied", PermissionError),
                                                        (404, "NoSuchBucket", FileNotFoundError),
                                                        (403, "InvalidAccessKeyId", PermissionError)])
def test_permanent_answers_are_not_retried(fast_policy, capsys, status, code, error):
    server = _serve([(status, code)] * 20)
    try:
        fs = _fs(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(error):
            fs.pipe_file("bkt/obj", b"x")
    finally:
        server.shutdown()
    assert len(server.seen) == 1 and _waits(capsys.readouterr().err) == []


def test_a_refused_connection_gives_up_after_the_attempts(fast_policy, monkeypatch, capsys):
    monkeypatch.setenv("COPGEN_STORAGE_RETRIES", "3")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fs = _fs(f"http://127.0.0.1:{port}")
    with pytest.raises(StorageUnavailableError, match=r"s3://bkt/obj: gave up after 3 attempt\(s\)") as info:
        fs.cat_file("bkt/obj")
    assert info.value.exit_code == 4
    waits = _waits(capsys.readouterr().err)
    assert [w.split(": ")[0] for w in waits] == ["waiting for s3://bkt/obj (attempt 1/3)",
                                                 "waiting for s3://bkt/obj (attempt 2/3)"]
    assert all("connection refused" in w for w in waits)


def test_a_server_that_never_answers_times_out_and_is_retried(fast_policy, monkeypatch, capsys):
    monkeypatch.setenv("COPGEN_STORAGE_RETRIES", "2")
    monkeypatch.setenv("COPGEN_STORAGE_TIMEOUT", "0.3")
    with socket.socket() as silent:  # listens (the kernel accepts connections) but never reads or replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        fs = _fs(f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(StorageUnavailableError, match="gave up after 2 attempt"):
            fs.pipe_file("bkt/obj", b"x")
    waits = _waits(capsys.readouterr().err)
    assert len(waits) == 1 and "(attempt 1/2): timed out" in waits[0]


def test_policy_from_the_environment():
    assert RetryPolicy.from_env({}) == RetryPolicy(attempts=8, backoff=0.5, backoff_max=30.0, timeout=15.0)
    p = RetryPolicy.from_env({"COPGEN_STORAGE_RETRIES": "3", "COPGEN_STORAGE_BACKOFF": "0.2",
                              "COPGEN_STORAGE_BACKOFF_MAX": "1", "COPGEN_STORAGE_TIMEOUT": "2"})
    assert (p.attempts, p.backoff, p.backoff_max, p.timeout, p.connect_timeout) == (3, 0.2, 1.0, 2.0, 2.0)
    for var, text in [("COPGEN_STORAGE_RETRIES", "0"), ("COPGEN_STORAGE_RETRIES", "many"),
                      ("COPGEN_STORAGE_TIMEOUT", "0"), ("COPGEN_STORAGE_BACKOFF", "-1")]:
        with pytest.raises(RetryConfigError, match=var):
            RetryPolicy.from_env({var: text})


def test_backoff_doubles_with_jitter_and_is_capped():
    p = RetryPolicy(backoff=0.5, backoff_max=4.0)
    assert [p.delay(a, rng=lambda: 1.0) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [p.delay(a, rng=lambda: 0.0) for a in range(1, 4)] == [0.25, 0.5, 1.0]  # jitter: upper half


def test_what_counts_as_transient():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def answer(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    assert transient(answer(503, "SlowDown")) == "HTTP 503 SlowDown"
    assert transient(answer(400, "RequestTimeout")) == "HTTP 400 RequestTimeout"
    assert transient(answer(429, "TooManyRequests")) is not None
    assert transient(answer(409, "ConditionalRequestConflict")) is not None
    for status, code in [(403, "AccessDenied"), (404, "NoSuchKey"), (404, "NoSuchBucket"),
                         (403, "SignatureDoesNotMatch"), (412, "PreconditionFailed")]:
        assert transient(answer(status, code)) is None
    signed = "http://127.0.0.1:1/b?X-Amz-Signature=s"
    assert transient(EndpointConnectionError(endpoint_url=signed)) is not None
    assert "Signature" not in transient(ReadTimeoutError(endpoint_url=signed))
    from botocore.exceptions import EndpointResolutionError, NoCredentialsError, SSLError

    for config_error in (NoCredentialsError(), EndpointResolutionError(msg="no region"),
                         SSLError(endpoint_url=signed, error="certificate verify failed")):
        assert transient(config_error) is None  # the same answer next time: at once, not 8 times
    assert transient(ValueError("bad")) is None and transient(FileNotFoundError(2, "gone")) is None


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "copgen.flows.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "AWS_ACCESS_KEY_ID": "testing",
                                            "AWS_SECRET_ACCESS_KEY": "testing", "COLUMNS": "200", **env})


def test_an_unreachable_source_at_the_start_is_exit_4_after_visible_attempts(tmp_path):
    """The preflight (before Prefect or Dask start) reads the source through the same policy: an endpoint
    that refuses is an outage (exit 4 after the attempts), not a wrong option (exit 2)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _cli("complete", "--source", "s3://bkt/world", "--out", str(tmp_path / "o"),
               "--storage-option", f"endpoint_url=http://127.0.0.1:{port}",
               COPGEN_STORAGE_RETRIES="2", COPGEN_STORAGE_BACKOFF="0.01")
    assert res.returncode == 4, res.stderr[-2000:]
    assert "(attempt 1/2): connection refused" in res.stderr and "gave up after 2 attempt(s)" in res.stderr
    assert "Traceback" not in res.stderr and "hint:" in res.stderr


def test_a_refused_source_at_the_start_is_exit_2_without_retries(tmp_path):
    server = _serve([(403, "AccessDenied")] * 50)
    try:
        res = _cli("complete", "--source", "s3://bkt/world", "--out", str(tmp_path / "o"),
                   "--storage-option", f"endpoint_url=http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert res.returncode == 2, res.stderr[-2000:]
    assert "waiting for" not in res.stderr and "Traceback" not in res.stderr
