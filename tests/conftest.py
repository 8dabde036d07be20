"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Compute in this process as a subprocess with OMP_NUM_THREADS=1 does: with other thread
    counts, float32 sums may split differently and round to a neighbouring value."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="session")
def native_scores(tmp_path_factory: pytest.TempPathFactory):
    """The compiled attention scores, built once per test session in a temporary cache; the
    tests that need them skip where this machine cannot build them (no C compiler, no libmvec)."""
    from captioner.models.native_attention import load_native_scores

    native, note = load_native_scores(tmp_path_factory.mktemp("kernels"))
    if native is None:
        pytest.skip(f"compiled attention scores unavailable: {note}")
    return native


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server, moto's, on 127.0.0.1 for the whole session (its URL); the tests that
    use it skip where it cannot start (moto[server] or s3fs missing, no local port)."""
    try:
        import s3fs  # noqa: F401 - what captioner reaches S3 with
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        pytest.skip(f"an S3 test server needs moto[server] and s3fs ({error})")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
    except OSError as error:
        pytest.skip(f"the S3 test server cannot start ({error})")
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on the test S3 server (``s3://NAME``), reached through the standard
    AWS variables as a user's MinIO would be; they also reach subprocesses started here."""
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
