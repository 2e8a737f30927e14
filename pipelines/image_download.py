"""Fetching images that sources give only by URL (OBELICS, MMC4, URL lists) into a cache the prepare job reads.

- `fetch_image`: one URL, with connect/read/total timeouts, a size limit enforced while the body streams (never
  more than the limit + 1 bytes read), retries with exponential back-off and jitter on retryable failures
  (timeouts, connection errors, 408, 429, 5xx; Retry-After honoured up to a cap) and none on other 4xx, and the
  body checked to be an image from its header. Every failure is a reason code of REJECT_REASONS.
- `ImageCache`: img2dataset's per-image files (`KEY.jpg` + `KEY.json` with url, key, status, error_message,
  width, height, original_width, original_height, exif, sha256) in folders, keyed by a hash of the URL rather than
  an input position, so any task, run or source finds a URL's image and one fetched by many documents is fetched
  once. Writes are atomic (temporary name, then rename; the .json last), so a killed run resumes where it was.
  Permanent failures are remembered and not fetched again; transient ones (after their retries) are.
- `ImageDownloader`: a worker's bounded thread pool (and per-host limit) over the cache and the fetcher.
- `download_session`: the HTTP session a download uses. Hosts come from data, so nothing of the environment goes to
  them (no ~/.netrc credentials, no proxies), and unless `allow_private_addresses` is set every connection, redirect
  hops included, goes only to a public address that the check itself resolved (no loopback, private network, or
  link-local cloud metadata service at 169.254.169.254; no second lookup a rebinding DNS could answer differently).
- `UrlImages`: what the prepare job's read step runs: it streams a read task's records, fetches their URL images
  a window ahead, rewrites each URL reference to the cached file, and turns failures into rejects (or, in an
  interleaved document, drops the image and counts it), writing a per-shard download report.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import io
import ipaddress
import json
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from model.files import storage
from model.files.atomic import write_atomic
from pipelines.raw_records import Reject
from schemas.download_config import DownloadConfig

DOWNLOAD_STAGE = "download"
REPORT_SUFFIX = ".downloads.json"
CHUNK_BYTES = 64 << 10
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
NOT_FOUND_STATUSES = frozenset({404, 410})
PRIVATE_ADDRESS = "download_private_address"  # refused by the settings, not the URL: never cached
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
MAX_EXIF_CHARS = 2000


class DownloadFailure(Exception):
    """One URL that could not be fetched: `reason` is a code of REJECT_REASONS; `retryable` says whether a later
    attempt (or run) may succeed."""

    def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after


@dataclass(frozen=True)
class CacheEntry:
    """What is known of one URL: its cached file (success) or why it failed."""

    url: str
    key: str
    path: str | None = None
    reason: str | None = None
    detail: str = ""
    retryable: bool = False
    fetched: bool = False  # fetched in this run (not found in the cache)
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.path is not None


def check_url(url: str) -> str:
    """The URL if it is http(s) with a host; file:// and every other scheme in data are refused (never fetched)."""
    try:
        parts = urlsplit(url)
    except ValueError as err:
        raise DownloadFailure("download_bad_url", f"{url[:200]}: {err}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise DownloadFailure("download_bad_url", f"only http and https are fetched, not {parts.scheme!r}: {url[:200]}")
    if not parts.hostname:
        raise DownloadFailure("download_bad_url", f"no host in {url[:200]}")
    return url


def cache_key(url: str) -> str:
    """24 hex digits of the URL's SHA-256: the file name of its image and metadata in the cache."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _http_failure(status: int, url: str, retry_after: str | None) -> DownloadFailure:
    if status in NOT_FOUND_STATUSES:
        return DownloadFailure("download_not_found", f"HTTP {status} from {url[:200]}")
    retryable = status in RETRY_STATUSES or status >= 500
    return DownloadFailure(
        "download_http_error", f"HTTP {status} from {url[:200]}", retryable, _retry_after(retry_after)
    )


def _opted_out(header: str | None, disallowed: set[str]) -> str | None:
    """The directive of an X-Robots-Tag header that opts the image out, if any (`noai`, `otherbot: noai` ...)."""
    if not header or not disallowed:
        return None
    for part in header.lower().replace(";", ",").split(","):
        directive = part.rsplit(":", 1)[-1].strip()  # "googlebot: noindex" applies too, as img2dataset reads it
        if directive in disallowed:
            return directive
    return None


def read_limited(raw: Any, max_bytes: int, deadline: float) -> bytes:
    """The body of a streamed response, refusing it once it passes `max_bytes` (at most max_bytes + 1 are read)
    or once the attempt passes `deadline` (a server that trickles bytes would outlive any read timeout)."""
    buffer = bytearray()
    # read1: whatever one socket read brings (up to the amount), so the deadline is checked as bytes trickle in;
    # read(amount) would wait for the whole amount.
    read = raw.read1 if hasattr(raw, "read1") else raw.read
    while True:
        chunk = read(min(CHUNK_BYTES, max_bytes + 1 - len(buffer)), decode_content=True)
        if not chunk:
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > max_bytes:
            raise DownloadFailure("download_too_large", f"more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise DownloadFailure(
                "download_timeout", f"still receiving after the total timeout ({len(buffer)} bytes)", retryable=True
            )


def inspect_image(data: bytes) -> dict[str, Any]:
    """Format, size and EXIF of image bytes, from the header only (bounded: nothing is decoded); raises
    DownloadFailure download_not_image for anything Pillow cannot identify. Pixel counts are not judged here (Pillow's
    bomb guard is off): the image step applies the source's `max_pixels`, whatever it is, to what the cache holds."""
    from PIL import ExifTags, Image

    from model.tokenizers.image_preprocess import pillow_pixel_limit

    if not data:
        raise DownloadFailure("download_not_image", "the response is empty")
    try:
        with pillow_pixel_limit(None):
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format or "", image.size
                image.verify()  # PNG chunk CRCs and the like; cheap, decodes no pixels; must come first
            with Image.open(io.BytesIO(data)) as image:
                try:
                    exif = {ExifTags.TAGS.get(k, str(k)): str(v) for k, v in image.getexif().items()}
                except Exception:  # a damaged EXIF block does not make the image unusable
                    exif = {}
    except Exception as err:  # Pillow raises many kinds for bytes it cannot parse; all mean "not an image"
        detail = f"{type(err).__name__}: {err}; starts with {data[:16]!r}"
        raise DownloadFailure("download_not_image", detail[:300]) from None
    exif_json = json.dumps(exif, sort_keys=True)
    return {
        "format": fmt,
        "width": width,
        "height": height,
        "exif": exif_json if exif and len(exif_json) <= MAX_EXIF_CHARS else None,
    }


def backoff_delay(attempt: int, config: DownloadConfig, retry_after: float | None, rng: random.Random) -> float:
    """Seconds before retry number `attempt` (0-based): exponential from `backoff_s` with jitter (half to all of
    it), or the server's Retry-After; capped at `max_backoff_s` either way."""
    if retry_after is not None:
        return min(retry_after, config.max_backoff_s)
    delay = min(config.backoff_s * 2**attempt, config.max_backoff_s)
    return delay * (0.5 + rng.random() / 2)


@dataclass
class Fetched:
    """A fetched image: its bytes and what `inspect_image` found."""

    data: bytes
    info: dict[str, Any]
    attempts: int


def fetch_image(
    url: str,
    session: Any,
    config: DownloadConfig,
    *,
    host_slot: Any = None,
    rng: random.Random | None = None,
    sleep: Any = time.sleep,
) -> Fetched:
    """Fetch one image URL (retrying what may succeed later); raises DownloadFailure with `.attempts` set."""
    rng = rng or random.Random()
    check_url(url)
    attempts = 0
    while True:
        attempts += 1
        try:
            if host_slot is not None:
                with host_slot:
                    data = _attempt(url, session, config)
            else:
                data = _attempt(url, session, config)
            return Fetched(data, inspect_image(data), attempts)
        except DownloadFailure as failure:
            failure.attempts = attempts  # type: ignore[attr-defined]
            if not failure.retryable or attempts > config.retries:
                raise
            sleep(backoff_delay(attempts - 1, config, failure.retry_after, rng))


def _attempt(url: str, session: Any, config: DownloadConfig) -> bytes:
    """One GET, classified: every error the HTTP stack raises becomes a DownloadFailure."""
    import requests
    import urllib3.exceptions as u3

    deadline = time.monotonic() + config.total_timeout_s
    try:
        with session.get(url, stream=True, timeout=(config.connect_timeout_s, config.read_timeout_s)) as response:
            if response.status_code >= 400:
                raise _http_failure(response.status_code, url, response.headers.get("Retry-After"))
            directive = _opted_out(
                response.headers.get("X-Robots-Tag"), {d.lower() for d in config.disallowed_header_directives}
            )
            if directive:
                raise DownloadFailure("download_opted_out", f"X-Robots-Tag {directive} from {url[:200]}")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > config.max_bytes:
                raise DownloadFailure("download_too_large", f"Content-Length {length} > {config.max_bytes} bytes")
            return read_limited(response.raw, config.max_bytes, deadline)
    except DownloadFailure:
        raise
    except (requests.Timeout, u3.TimeoutError) as err:
        raise DownloadFailure("download_timeout", f"{type(err).__name__} from {url[:200]}", retryable=True) from None
    except requests.TooManyRedirects:
        raise DownloadFailure(
            "download_too_many_redirects", f"more than {config.max_redirects} from {url[:200]}"
        ) from None
    except (
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        u3.LocationParseError,
    ) as err:
        # e.g. a redirect to ftp:// or file://: requests has no adapter for it, so nothing is fetched
        raise DownloadFailure("download_bad_url", f"{type(err).__name__}: {err}"[:300]) from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, u3.HTTPError, ConnectionError) as err:
        raise DownloadFailure(
            "download_connection_error", f"{type(err).__name__}: {err}"[:300], retryable=True
        ) from None
    except requests.RequestException as err:  # content decoding errors and the like: the same bytes would come again
        raise DownloadFailure("download_http_error", f"{type(err).__name__}: {err}"[:300]) from None
    except (ValueError, UnicodeError) as err:  # e.g. a host name IDNA cannot encode
        raise DownloadFailure("download_bad_url", f"{type(err).__name__}: {err}"[:300]) from None


def address_is_public(address: str) -> bool:
    """Whether a resolved IP address is on the public internet: not loopback, private, shared (CGNAT), link-local
    (the cloud metadata service), reserved, unspecified or multicast, nor an IPv4-mapped IPv6 form of one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@functools.cache
def _public_only_adapter() -> type:
    """A requests adapter whose connections resolve their host, refuse it unless an address is public, and connect
    to that checked address; built on first use (requests and urllib3 are imported only by downloads)."""
    import socket

    import requests.adapters
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util.connection import allowed_gai_family

    class PublicOnly:
        def _new_conn(self) -> socket.socket:
            name = self._dns_host  # type: ignore[attr-defined]
            try:
                found = socket.getaddrinfo(name.strip("[]"), self.port, allowed_gai_family(), socket.SOCK_STREAM)  # type: ignore[attr-defined]
            except socket.gaierror as err:
                raise NameResolutionError(self.host, self, err) from err  # type: ignore[attr-defined, arg-type]
            addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
            public = [a for a in addresses if address_is_public(a)]
            if not public:
                where = name if addresses == [name.strip("[]")] else f"{name} ({', '.join(addresses[:4])})"
                raise DownloadFailure(
                    PRIVATE_ADDRESS, f"{where[:300]} is not a public address (download.allow_private_addresses is off)"
                )
            try:  # connect to an address checked (as urllib3 would: each in turn), with urllib3's own errors
                for address in public[:-1]:
                    self._dns_host = address
                    try:
                        return super()._new_conn()  # type: ignore[misc]
                    except (NewConnectionError, ConnectTimeoutError):
                        continue
                self._dns_host = public[-1]
                return super()._new_conn()  # type: ignore[misc]
            finally:
                self._dns_host = name  # the name again: Host header, TLS server name and certificate check

    class PublicHTTPConnection(PublicOnly, HTTPConnection):
        pass

    class PublicHTTPSConnection(PublicOnly, HTTPSConnection):
        pass

    class PublicHTTPPool(HTTPConnectionPool):
        ConnectionCls = PublicHTTPConnection

    class PublicHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = PublicHTTPSConnection

    class PublicOnlyAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": PublicHTTPPool, "https": PublicHTTPSPool}

    return PublicOnlyAdapter


def download_session(config: DownloadConfig) -> Any:
    """A requests session for fetching URLs named in data (see the module docstring for what it refuses)."""
    import requests

    session = requests.Session()
    # trust_env off: requests would add ~/.netrc credentials for a host named in data (again on every redirect
    # hop), route through the environment's proxies and CA bundle; images are public and fetched directly.
    session.trust_env = False
    session.max_redirects = config.max_redirects
    session.headers["User-Agent"] = config.user_agent
    if not config.allow_private_addresses:
        adapter = _public_only_adapter()()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session


class ImageCache:
    """Fetched images and failures on disk, looked up by URL: `ROOT/KKKK/KEY.EXT` and `ROOT/KKKK/KEY.json`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def json_path(self, key: str) -> Path:
        return self.root / key[:4] / f"{key}.json"

    def lookup(self, url: str) -> CacheEntry | None:
        """The cached outcome of `url`, or None when it must be fetched (never tried, a transient failure, or a
        file that went missing)."""
        key = cache_key(url)
        try:
            meta = json.loads(self.json_path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("url") != url:  # a damaged file, or another URL with this hash
            return None
        if meta.get("status") == "success":
            path = self.json_path(key).with_name(meta.get("file") or "")
            return CacheEntry(url, key, path=str(path)) if path.is_file() else None
        if meta.get("retryable", True):
            return None
        return CacheEntry(
            url, key, reason=meta.get("reason") or "download_http_error", detail=meta.get("error_message") or ""
        )

    def store_success(self, url: str, fetched: Fetched) -> CacheEntry:
        key = cache_key(url)
        info = fetched.info
        name = f"{key}.{EXTENSIONS.get(info['format'], info['format'].lower() or 'bin')}"
        folder = self.root / key[:4]
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / name, fetched.data)
        meta = {
            "url": url,
            "key": key,
            "status": "success",
            "error_message": None,
            "width": info["width"],
            "height": info["height"],  # no resize: as fetched
            "original_width": info["width"],
            "original_height": info["height"],
            "exif": info["exif"],
            "sha256": hashlib.sha256(fetched.data).hexdigest(),
            "file": name,
            "bytes": len(fetched.data),
            "format": info["format"],
            "attempts": fetched.attempts,
            "fetched_at": round(time.time(), 3),
        }
        write_atomic(self.json_path(key), json.dumps(meta, sort_keys=True).encode())  # last: marks it complete
        return CacheEntry(url, key, path=str(folder / name), fetched=True, attempts=fetched.attempts)

    def store_failure(self, url: str, failure: DownloadFailure, attempts: int) -> CacheEntry:
        key = cache_key(url)
        # img2dataset's two failure statuses: an image that came but could not be used is failed_to_resize
        status = (
            "failed_to_resize"
            if failure.reason in ("download_not_image", "image_too_large")
            else ("failed_to_download")
        )
        meta = {
            "url": url,
            "key": key,
            "status": status,
            "error_message": failure.detail,
            "width": None,
            "height": None,
            "original_width": None,
            "original_height": None,
            "exif": None,
            "sha256": None,
            "reason": failure.reason,
            "retryable": failure.retryable,
            "attempts": attempts,
            "fetched_at": round(time.time(), 3),
        }
        self.json_path(key).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.json_path(key), json.dumps(meta, sort_keys=True).encode())
        return CacheEntry(
            url,
            key,
            reason=failure.reason,
            detail=failure.detail,
            retryable=failure.retryable,
            fetched=True,
            attempts=attempts,
        )


class ImageDownloader:
    """A worker's downloads: at most `concurrency` in flight (`per_host` to one host), each URL looked up in the
    cache first and fetched at most once while its outcome is remembered here."""

    def __init__(self, config: DownloadConfig, memo_size: int = 65536):
        if config.cache_dir is None:
            raise ValueError("downloads need download.cache_dir")
        self.config = config
        self.cache = ImageCache(config.cache_dir)
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="image-download")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._memo: OrderedDict[str, Future[CacheEntry]] = OrderedDict()
        self._memo_size = memo_size
        self._sessions: list[Any] = []  # one per pool thread, closed with the downloader

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = download_session(self.config)
            with self._lock:
                self._sessions.append(session)
        return session

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            return self._hosts.setdefault(host, threading.BoundedSemaphore(self.config.per_host))

    def _get(self, url: str) -> CacheEntry:
        key = cache_key(url)
        try:
            check_url(url)
        except DownloadFailure as failure:  # not stored: nothing was fetched, and the URL names the problem
            return CacheEntry(url, key, reason=failure.reason, detail=failure.detail)
        cached = self.cache.lookup(url)
        if cached is not None:
            return cached
        try:
            fetched = fetch_image(url, self._session(), self.config, host_slot=self._host_slot(url))
        except DownloadFailure as failure:
            if failure.reason == PRIVATE_ADDRESS:  # the settings' verdict, not the URL's: asked again next run
                return CacheEntry(url, key, reason=failure.reason, detail=failure.detail, fetched=True, attempts=1)
            return self.cache.store_failure(url, failure, getattr(failure, "attempts", 1))
        except Exception as err:  # one odd URL is one counted failure (not cached: tried again next run)
            return CacheEntry(url, key, reason="unexpected_error", detail=f"{type(err).__name__}: {err}"[:300])
        return self.cache.store_success(url, fetched)

    def submit(self, url: str) -> Future[CacheEntry]:
        """The outcome of `url`, as a future; a URL already asked for shares the first request's future."""
        with self._lock:
            future = self._memo.get(url)
            if future is not None:
                self._memo.move_to_end(url)
                return future
            future = self.pool.submit(self._get, url)
            self._memo[url] = future
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
            return future

    def get_many(self, urls: Iterable[str]) -> dict[str, CacheEntry]:
        """Outcomes of several URLs, fetched concurrently."""
        futures = {url: self.submit(url) for url in urls}
        return {url: f.result() for url, f in futures.items()}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._memo.clear()
            sessions, self._sessions = self._sessions, []
        for session in sessions:  # their pooled keep-alive connections
            session.close()


def url_slots(kind: str, record: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(url, container, index) of every image reference of `record` that holds only a URL."""
    if kind == "image_text":
        refs = [(record, "image")]
    elif kind == "interleaved":
        refs = [(record["images"], n) for n in range(len(record["images"]))]
    elif kind == "sft":
        refs = [(seg, "image") for side in ("prompt", "answer") for seg in record[side]]
    else:
        return []
    out = []
    for container, index in refs:
        ref = container[index]
        if isinstance(ref, dict) and ref.get("url") and ref.get("bytes") is None and not ref.get("path"):
            out.append((ref["url"], container, index))
    return out


@dataclass
class DownloadStats:
    """One read task's download counts (img2dataset's stats keys, and what happened to records)."""

    urls: int = 0
    successes: int = 0
    fetched: int = 0
    from_cache: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> images
    images_dropped: int = 0
    records_rejected: int = 0

    def as_dict(self) -> dict[str, Any]:
        failed_to_resize = sum(n for r, n in self.failures.items() if r in ("download_not_image", "image_too_large"))
        return {
            "count": self.urls,
            "successes": self.successes,
            "failed_to_download": sum(self.failures.values()) - failed_to_resize,
            "failed_to_resize": failed_to_resize,
            "status_dict": dict(sorted(self.failures.items())),
            "fetched": self.fetched,
            "from_cache": self.from_cache,
            "images_dropped": self.images_dropped,
            "records_rejected": self.records_rejected,
        }


NOT_LOCAL_HINT = "set download.cache_dir in the prepare config to fetch it"


class UrlImages:
    """The read step's URL handling for one source: built in the driver, opened once per worker.

    With downloads off, a record with a URL-only image is a reject (`image_not_local`, with a hint). With them on,
    its images are fetched a window of records ahead of the one being yielded, so a worker keeps `concurrency`
    downloads in flight while the task streams in order.
    """

    def __init__(self, config: DownloadConfig | None, source: str, kind: str, report_dir: str | None = None):
        self.config = config if config is not None and config.enabled else None
        self.source, self.kind, self.report_dir = source, kind, report_dir
        self.downloader: ImageDownloader | None = None

    def open(self) -> None:
        if self.config is not None and self.downloader is None:
            self.downloader = ImageDownloader(self.config)

    def close(self) -> None:
        if self.downloader is not None:
            self.downloader.close()
            self.downloader = None

    def __getstate__(self) -> dict[str, Any]:  # a DoFn is pickled before its setup: never with a live pool
        return {**self.__dict__, "downloader": None}

    def resolve(self, items: Iterable[Any], shard_id: int | None = None) -> Iterator[Any]:
        """Records (and rejects, passed through) of a read task, in order, with URL images made local."""
        self.open()
        stats = DownloadStats()
        window: deque[tuple[Any, dict[str, Future[CacheEntry]] | None]] = deque()
        lookahead = 2 * self.config.concurrency if self.config else 0
        for item in items:
            window.append(self._start(item))
            while len(window) > lookahead:
                yield self._finish(*window.popleft(), stats)
        while window:
            yield self._finish(*window.popleft(), stats)
        self._report(shard_id, stats)

    def _start(self, item: Any) -> tuple[Any, dict[str, Future[CacheEntry]] | None]:
        if isinstance(item, Reject):
            return item, None
        slots = url_slots(self.kind, item)
        if not slots or self.downloader is None:
            return item, None
        return item, {url: self.downloader.submit(url) for url, _, _ in slots}

    def _finish(self, item: Any, futures: dict[str, Future[CacheEntry]] | None, stats: DownloadStats) -> Any:
        if isinstance(item, Reject):
            return item
        slots = url_slots(self.kind, item)
        if not slots:
            return item
        stats.urls += len(slots)
        if futures is None:  # downloads are off
            stats.records_rejected += 1
            stats.failures["image_not_local"] += len(slots)
            return Reject(
                self.source,
                item["id"],
                "read",
                "image_not_local",
                f"image given only as a URL: {slots[0][0][:200]}; {NOT_LOCAL_HINT}",
            )
        entries = {url: f.result() for url, f in futures.items()}
        failed: list[tuple[int | str, CacheEntry]] = []
        for url, container, index in slots:
            entry = entries[url]
            stats.fetched += entry.fetched and entry.ok
            stats.from_cache += not entry.fetched and entry.ok
            if entry.ok:
                stats.successes += 1
                container[index] = {"bytes": None, "path": entry.path, "url": url}
            else:
                stats.failures[entry.reason or "download_http_error"] += 1
                failed.append((index, entry))
        if not failed:
            return item
        first = failed[0][1]
        if self.kind == "interleaved" and self.config is not None and self.config.failed_image == "drop":
            drop = {index for index, _ in failed}
            item["texts"] = [t for n, t in enumerate(item["texts"]) if n not in drop]
            item["images"] = [i for n, i in enumerate(item["images"]) if n not in drop]
            if item["texts"]:
                stats.images_dropped += len(drop)
                return item
        stats.records_rejected += 1
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return Reject(
            self.source,
            item["id"],
            DOWNLOAD_STAGE,
            first.reason or "download_http_error",
            f"{first.detail or first.url}{more}"[:1000],
        )

    def _report(self, shard_id: int | None, stats: DownloadStats) -> None:
        """shard-NNNNN.downloads.json beside the shard (only for tasks with URL images; a stale one is removed)."""
        if self.report_dir is None or shard_id is None:
            return
        from pipelines.shard_writer import shard_name

        path = storage.join(self.report_dir, f"{shard_name(shard_id)}{REPORT_SUFFIX}")  # a URL on a store
        if not stats.urls:
            storage.remove(path)
            return
        storage.write_text(path, json.dumps(stats.as_dict(), indent=2, sort_keys=True))


def download_totals(out_dir: str | Path, shard_ids: Iterable[int]) -> dict[str, Any] | None:
    """The download reports of a source's shards added up (for its manifest); None when no shard had URL images."""
    from pipelines.shard_writer import shard_name

    totals: Counter = Counter()
    by_reason: Counter = Counter()
    found = False
    for shard_id in shard_ids:
        try:
            report = json.loads(storage.read_text(storage.join(out_dir, f"{shard_name(shard_id)}{REPORT_SUFFIX}")))
        except (OSError, ValueError):  # no URL images in that shard (written atomically, so never half a file)
            continue
        found = True
        by_reason.update(report.get("status_dict", {}))
        totals.update({k: v for k, v in report.items() if isinstance(v, int)})
    return {**dict(sorted(totals.items())), "status_dict": dict(sorted(by_reason.items()))} if found else None
