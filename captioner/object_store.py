"""Feature stores in object storage: ``s3://bucket/name.zarr`` (and ``gs://``, ``az://``).

A store in object storage is the same Zarr v3 group as on a disk, reached through zarr's
FsspecStore (s3fs, gcsfs or adlfs, from the optional extra ``captioner[s3]``). Credentials and
endpoints come from where the provider's own tools look (for S3: AWS_ACCESS_KEY_ID,
AWS_PROFILE, ~/.aws/config, AWS_ENDPOINT_URL for MinIO, Ceph or a local server); anything else
goes in the fsspec storage options (``--storage-options JSON``).

How writing stays safe without a rename
---------------------------------------
On a disk, a store is built in a temporary folder and renamed into place, and zarr writes each
chunk file under a temporary name and renames it. Object storage has no rename, but it has
something as good: a PUT is atomic (a reader sees the whole old object, the whole new one, or
nothing; a multipart upload appears only when completed) and, on S3 since 2020, a read after a
PUT sees it. So the protocol rests on the order of PUTs:

- Creating a store: the empty store (metadata, ids, splits, captions) is built on the local disk
  first, then every object is uploaded except the group's ``zarr.json``, which goes last. That
  object, holding the schema version, is the store's "made" marker: a store without it does not
  exist for any reader, and the next run builds it again (a prefix without the marker that holds
  anything but a store's arrays is refused, never deleted). Replacing a store (``--overwrite``)
  deletes the marker first, then the rest.
- Writing a shard: its features are one object per array (the spatial maps' shard, the pooled
  chunk, the failure reasons), each a whole-object PUT, and its ``status`` chunk, the shard's
  "done" marker, is PUT only after them. A reader counts a shard only through its status, so no
  reader ever sees a half-written shard: a kill before the status PUT leaves the shard pending
  and the next run writes it again, whole. Ranks under torchrun own whole shards, as on a disk.
- Nothing is ever half-written, so nothing needs cleaning up (the disk protocol's ``*.partial``
  files have no counterpart).

Checksums travel inside the chunks (crc32c), so `captioner features verify` reads a remote store
as it reads a local one. Reads retry transient network errors a bounded number of times with a
growing pause (TRANSIENT_ATTEMPTS), and a cache folder (``--cache DIR``) keeps a copy of every
feature object fetched, checked against the object's MD5 (its S3 ETag) when it arrives and named
after its ETag, so that a shard rewritten in the bucket (a repair) is fetched anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.storage import WrapperStore

from captioner.errors import CaptionerError

# The schemes served, and the fsspec package each needs.
SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
INSTALL_HINT = "pip install 'captioner[s3]'"
TRANSIENT_ATTEMPTS = 4  # tries of a read that meets a network error, 0.5 s, 1 s, 2 s apart
_FIRST_PAUSE = 0.5
MARKER = "zarr.json"  # the group's metadata: written last, the store's "made" marker
# The store's own top-level names: a prefix holding only these is a store whose making stopped.
STORE_NODES = frozenset(
    {"spatial", "pooled", "status", "failure", "image_id", "image_path", "split", "captions"}
)
_FEATURE_CHUNKS = ("spatial/c/", "pooled/c/")  # what the cache keeps
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.+)$")


def is_url(text: str | os.PathLike) -> bool:
    """Whether `text` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and _URL.match(text) is not None


class RemoteStore:
    """Where a store lives in object storage: its URL, fsspec storage options and, optionally, a
    local cache folder. Prints as its URL; its options (which may hold secrets) are never shown
    and never saved in checkpoints."""

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, cache: Path | None = None
    ) -> None:
        match = _URL.match(url)
        if match is None:
            raise CaptionerError(f"{url}: not a URL (scheme://bucket/name.zarr)")
        self.scheme = match.group(1)
        if self.scheme not in SCHEMES:
            known = ", ".join(f"{s}://" for s in SCHEMES)
            raise CaptionerError(f"{url}: unknown storage scheme; stores live on a disk or {known}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = Path(cache) if cache is not None else None
        self._filesystem = None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteStore) and (
            (self.url, self.storage_options, self.cache)
            == (other.url, other.storage_options, other.cache)
        )

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):
        # Sent to DataLoader workers and other ranks: the description, not open connections.
        return RemoteStore, (self.url, self.storage_options, self.cache)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def root(self) -> str:
        """The store's path within the filesystem (``bucket/name.zarr``)."""
        return _URL.match(self.url).group(2).rstrip("/")

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def filesystem(self):
        """The (synchronous) fsspec filesystem; CaptionerError in one line if its package is
        missing."""
        if self._filesystem is None:
            import fsspec

            try:
                self._filesystem, _ = fsspec.url_to_fs(self.url, **self.storage_options)
            except ImportError:
                raise CaptionerError(
                    f"{self.url}: stores on {self.scheme}:// need the {SCHEMES[self.scheme]}"
                    f" package: {INSTALL_HINT}"
                    + ("" if self.scheme == "s3" else f" (or pip install {SCHEMES[self.scheme]})")
                ) from None
        return self._filesystem

    def zarr_store(self, read_only: bool):
        """The zarr store over this location: reads retry transient errors, and feature chunks
        come through the cache folder where there is one."""
        from zarr.storage import FsspecStore

        self.filesystem()  # the missing package said in one line
        store = FsspecStore.from_url(
            self.url, storage_options=self.storage_options, read_only=read_only
        )
        versions = self.object_versions(_FEATURE_CHUNKS) if self.cache is not None else None
        return ResilientStore(store, self, versions)

    # ---- objects ----

    def read_marker(self) -> bytes | None:
        """The group's zarr.json, or None where there is none (no store was made here)."""
        with remote_errors(self):
            try:
                return self.filesystem().cat_file(f"{self.root}/{MARKER}")
            except FileNotFoundError:
                self.require_bucket()
                return None

    def exists(self) -> bool:
        """Whether a store was made here (its marker is there): as Path.exists is for a disk."""
        return self.read_marker() is not None

    def require_bucket(self) -> None:
        with remote_errors(self):
            if not self.filesystem().exists(self.bucket):
                raise CaptionerError(
                    f"{self.url}: no such bucket {self.bucket!r} at {self.endpoint()}; create it"
                    " or check the URL (and AWS_ENDPOINT_URL)"
                )

    def endpoint(self) -> str:
        explicit = self.storage_options.get("endpoint_url") or self.storage_options.get(
            "client_kwargs", {}
        ).get("endpoint_url")
        return explicit or os.environ.get("AWS_ENDPOINT_URL") or f"the {self.scheme} default"

    def object_versions(self, prefixes: Iterable[str]) -> dict[str, str]:
        """Key (relative to the store) -> version tag (ETag, else size) of the objects under
        `prefixes`: one listing per prefix, for the cache to name its copies after."""
        versions = {}
        with remote_errors(self):
            for prefix in prefixes:
                found = self.filesystem().find(f"{self.root}/{prefix}", detail=True)
                for path, info in found.items():
                    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
                    versions[path[len(self.root) + 1 :]] = str(tag or info.get("size")).strip('"')
        return versions

    def size(self) -> int:
        with remote_errors(self):
            return int(self.filesystem().du(self.root))

    def replace_with(self, folder: Path) -> None:
        """Make the store here a copy of the local store `folder`, marker last (see the module
        docstring). Whatever was here before is deleted, its marker first."""
        fs = self.filesystem()
        with remote_errors(self):
            if fs.exists(f"{self.root}/{MARKER}"):
                fs.rm_file(f"{self.root}/{MARKER}")
            if fs.exists(self.root):
                fs.rm(self.root, recursive=True)
            files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
            marker = Path(folder) / MARKER
            for file in [f for f in files if f != marker] + [marker]:
                key = file.relative_to(folder).as_posix()
                fs.pipe_file(f"{self.root}/{key}", file.read_bytes())

    def leftovers_are_a_store(self) -> bool:
        """Whether everything here (no marker) is a store's own arrays: a making that stopped."""
        fs = self.filesystem()
        with remote_errors(self):
            if not fs.exists(self.root):
                return True
            names = {path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(self.root, detail=False)}
        return names <= STORE_NODES


def store_location(
    text: str | os.PathLike, storage_options: str | None = None, cache: Path | None = None
) -> Path | RemoteStore:
    """What a command's store argument names: a local folder (Path) or a RemoteStore, with the
    JSON `storage_options` and the `cache` folder, which only object storage takes."""
    if not is_url(str(text)):
        if storage_options or cache is not None:
            option = "--storage-options" if storage_options else "--cache"
            raise CaptionerError(f"{text}: {option} applies to stores in object storage only")
        return Path(text)
    options = {}
    if storage_options:
        try:
            options = json.loads(storage_options)
        except ValueError as error:
            raise CaptionerError(f"--storage-options: not JSON ({error})") from None
        if not isinstance(options, dict):
            raise CaptionerError("--storage-options: a JSON object ({...}) is needed")
    return RemoteStore(str(text), options, cache)


def transient_errors() -> tuple[type[BaseException], ...]:
    """The network errors worth another try: refused or reset connections and timeouts."""
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, asyncio.TimeoutError)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errors += (BotoConnectionError, HTTPClientError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        errors += (ClientError,)
    return errors


@contextlib.contextmanager
def remote_errors(location: RemoteStore, doing: str = "") -> Iterator[None]:
    """The errors of object storage as one line naming the URL and the cause."""
    try:
        yield
    except CaptionerError:
        raise
    except PermissionError as error:
        raise CaptionerError(
            f"{location.url}: access denied{doing} ({_cause(error)}); check the credentials"
            " (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials)"
            " and that they may read and write this bucket"
        ) from None
    except FileNotFoundError as error:
        if "bucket does not exist" in str(error):
            raise CaptionerError(
                f"{location.url}: no such bucket {location.bucket!r} at {location.endpoint()};"
                " create it or check the URL (and AWS_ENDPOINT_URL)"
            ) from None
        raise
    except transient_errors() as error:
        raise CaptionerError(
            f"{location.url}: cannot reach {location.endpoint()}{doing} ({_cause(error)});"
            " check the network and the endpoint (AWS_ENDPOINT_URL)"
        ) from None
    except Exception as error:
        if type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
            raise CaptionerError(f"{location.url}: {_cause(error)}") from None
        raise


def _cause(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class ResilientStore(WrapperStore):
    """An FsspecStore whose reads retry transient errors (TRANSIENT_ATTEMPTS tries, the pause
    doubling), and whose feature chunks come from the cache folder where there is one."""

    def __init__(self, store: Store, location: RemoteStore, versions: dict[str, str] | None):
        super().__init__(store)
        self._location = location
        self._versions = versions  # key -> version of the feature objects, when caching

    def _with_store(self, store: Store) -> ResilientStore:
        return type(self)(store, self._location, self._versions)

    async def get(self, key: str, prototype, byte_range: ByteRequest | None = None):
        if self._versions is None or not key.startswith(_FEATURE_CHUNKS):
            return await self._retrying(self._store.get, key, prototype, byte_range)
        copy = await self._cached(key, prototype)
        if copy is None:
            return None
        return prototype.buffer.from_bytes(_read_range(copy, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        if self._versions is None:
            return await self._retrying(self._store.get_partial_values, prototype, key_ranges)
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _retrying(self, read, *arguments):
        """`read(*arguments)`, tried again after a transient error with a doubling pause; after
        the last try, one line (CaptionerError) naming the URL and the cause, which stops a
        training run with its last.pt as it was."""
        pause = _FIRST_PAUSE
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                return await read(*arguments)
            except transient_errors() as error:
                if attempt == TRANSIENT_ATTEMPTS - 1:
                    raise CaptionerError(
                        f"{self._location.url}: cannot reach {self._location.endpoint()} after"
                        f" {TRANSIENT_ATTEMPTS} tries ({_cause(error)}); check the network and"
                        " the endpoint, then run the command again"
                    ) from None
                await asyncio.sleep(pause)
                pause *= 2

    async def _cached(self, key: str, prototype) -> Path | None:
        """The cache's copy of the object `key`, fetched whole and checked first if it is not
        there yet; None if the store has no such object (a chunk never written)."""
        version = self._versions.get(key)
        if version is None:
            return None
        copy = self._location.cache / _cache_name(self._location) / f"{key}.{version}"
        if copy.exists():
            return copy
        fetched = await self._retrying(self._store.get, key, prototype, None)
        if fetched is None:
            return None
        data = fetched.to_bytes()
        if re.fullmatch(r"[0-9a-f]{32}", version) and hashlib.md5(data).hexdigest() != version:
            raise CaptionerError(
                f"{self._location.url}/{key}: the bytes fetched do not match the object's MD5"
                " (its ETag); run the command again"
            )
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f".{copy.name}.{uuid.uuid4().hex[:8]}")
        partial.write_bytes(data)
        os.replace(partial, copy)  # whole or not at all, as every cached copy
        return copy


def _read_range(path: Path, byte_range: ByteRequest | None) -> bytes:
    """The bytes of the file `path` that `byte_range` asks for (all of them for None)."""
    with open(path, "rb") as file:
        if byte_range is None:
            return file.read()
        if isinstance(byte_range, RangeByteRequest):
            file.seek(byte_range.start)
            return file.read(byte_range.end - byte_range.start)
        if isinstance(byte_range, OffsetByteRequest):
            file.seek(byte_range.offset)
            return file.read()
        if isinstance(byte_range, SuffixByteRequest):
            file.seek(max(0, os.fstat(file.fileno()).st_size - byte_range.suffix))
            return file.read()
    raise ValueError(f"unexpected byte range {byte_range!r}")


def _cache_name(location: RemoteStore) -> str:
    """The cache's folder for one store: its URL made a file name, and a hash that tells apart
    URLs that would read alike."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", location.url)[-80:]
    return f"{readable}-{hashlib.sha256(location.url.encode()).hexdigest()[:8]}"
