"""The download stage against a real HTTP server on 127.0.0.1: outcomes and reasons, retries, limits, the cache
(img2dataset's per-image files and metadata), resume without requests, and the prepare job end to end."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import io
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.image_download import (
    DownloadFailure,
    ImageCache,
    ImageDownloader,
    UrlImages,
    backoff_delay,
    cache_key,
    fetch_image,
    inspect_image,
    read_limited,
)
from pipelines.raw_records import Reject, image_ref
from schemas.download_config import DownloadConfig
from schemas.records import REJECT_REASONS


def image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG = image_bytes("JPEG", (80, 60), 0)
PNG = image_bytes("PNG", (64, 72), 1)
MAX_BYTES = 200_000


class Server:
    """A ThreadingHTTPServer with one endpoint per behaviour, counting hits per path and requests in flight."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits: Counter[str] = Counter()
        self.authorization: list[str] = []  # Authorization headers received
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.waiting = 0  # /slow-image requests inside their wait
        self.max_waiting = 0
        self.flaky_failures = 2  # /flaky answers 500 this many times, then the image
        self.images = {f"/img{n}.jpg": image_bytes("JPEG", (48 + 8 * n, 40 + 4 * n), 10 + n) for n in range(12)}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body in two writes: no delayed-ACK stalls

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] += 1
                    if self.headers.get("Authorization") is not None:
                        server.authorization.append(self.headers["Authorization"])
                    n = server.hits[path]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.respond(self, path, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (the size limit)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # clients that hang up are expected here
                pass

        self.httpd = QuietServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def respond(self, h: BaseHTTPRequestHandler, path: str, n: int) -> None:
        def send(status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> None:
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            if length:
                h.send_header("Content-Length", str(len(body)))
            else:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            h.wfile.write(body)

        if path == "/ok.jpg":
            send(200, JPEG, {"Content-Type": "image/jpeg"})
        elif path == "/ok.png":
            send(200, PNG, {"Content-Type": "image/png"})
        elif path in self.images:
            if path == "/img0.jpg" or path == "/img1.jpg":
                time.sleep(0.05)  # a little latency, so downloads overlap
            send(200, self.images[path])
        elif path == "/missing":
            send(404, b"no")
        elif path == "/gone":
            send(410, b"gone")
        elif path == "/forbidden":
            send(403, b"no")
        elif path == "/always500":
            send(500, b"broken")
        elif path == "/flaky":
            send(500, b"try again") if n <= self.flaky_failures else send(200, JPEG)
        elif path == "/busy":
            send(503, b"busy", {"Retry-After": "0"}) if n == 1 else send(200, PNG)
        elif path == "/slow":
            time.sleep(1.0)  # longer than the read timeout
            send(200, JPEG)
        elif path == "/trickle":
            h.send_response(200)
            h.send_header("Content-Length", str(len(JPEG)))
            h.end_headers()
            for i in range(0, len(JPEG), 100):  # every read within the read timeout, the whole past the total
                h.wfile.write(JPEG[i : i + 100])
                h.wfile.flush()
                time.sleep(0.1)
        elif path == "/huge":
            send(200, b"\0" * (MAX_BYTES + 1), {"Content-Type": "image/jpeg"})
        elif path == "/huge-no-length":
            send(200, JPEG + b"\0" * (4 * MAX_BYTES), length=False)
        elif path == "/page.html":
            send(200, b"<html><body>not an image</body></html>", {"Content-Type": "text/html"})
        elif path == "/empty":
            send(200, b"")
        elif path == "/noai":
            send(200, JPEG, {"X-Robots-Tag": "otherbot: noimageai"})
        elif path == "/redirect":
            send(302, b"", {"Location": "/ok.jpg"})
        elif path == "/redirect-file":
            send(302, b"", {"Location": "file:///etc/passwd"})
        elif path == "/redirect-to":  # to the URL given as the query
            send(302, b"", {"Location": h.path.partition("?")[2]})
        elif path == "/loop":
            send(302, b"", {"Location": "/loop"})
        elif path == "/gzip":  # 4x the limit once decompressed, a few kB on the wire
            send(200, gzip.compress(b"\0" * (4 * MAX_BYTES)), {"Content-Encoding": "gzip"})
        elif path == "/garbage":  # not HTTP at all
            h.wfile.write(b"garbage\r\n\r\n")
            h.close_connection = True
        elif path == "/slow-image":  # counted while it waits: the reply's last bytes race the client's next request
            with self.lock:
                self.waiting += 1
                self.max_waiting = max(self.max_waiting, self.waiting)
            time.sleep(0.2)
            with self.lock:
                self.waiting -= 1
            send(200, PNG)
        else:
            send(404, b"unknown")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def settings(cache: Path, **kw) -> DownloadConfig:
    base = {
        "cache_dir": str(cache),
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.3,
        "total_timeout_s": 0.6,
        "retries": 2,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "max_bytes": MAX_BYTES,
        "concurrency": 4,
        "per_host": 4,
        "allow_private_addresses": True,
    }
    return DownloadConfig(**(base | kw))


OUTCOMES = {
    "/ok.jpg": None,
    "/ok.png": None,
    "/redirect": None,
    "/missing": "download_not_found",
    "/gone": "download_not_found",
    "/forbidden": "download_http_error",
    "/always500": "download_http_error",
    "/slow": "download_timeout",
    "/trickle": "download_timeout",
    "/huge": "download_too_large",
    "/huge-no-length": "download_too_large",
    "/gzip": "download_too_large",  # counted after decompression
    "/page.html": "download_not_image",
    "/empty": "download_not_image",
    "/noai": "download_opted_out",
    "/redirect-file": "download_bad_url",
    "/loop": "download_too_many_redirects",
    "/garbage": "download_connection_error",
}
# attempts each outcome costs: retryable failures are tried 1 + retries times, the rest once
HITS = {
    "/always500": 3,
    "/slow": 3,
    "/trickle": 3,
    "/loop": 6,
    "/garbage": 3,
    "/ok.jpg": 2,
}  # /ok.jpg: itself and via /redirect


def test_each_outcome_has_its_reason_and_retries_only_what_may_succeed(server: Server, tmp_path: Path) -> None:
    downloader = ImageDownloader(settings(tmp_path / "cache"))
    try:
        entries = downloader.get_many(server.url(p) for p in OUTCOMES)
    finally:
        downloader.close()
    got = {url.removeprefix(server.base): e.reason for url, e in entries.items()}
    assert got == OUTCOMES
    assert all(reason is None or reason in REJECT_REASONS for reason in got.values())
    for path in OUTCOMES:
        assert server.hits[path] == HITS.get(path, 1), path
    ok = entries[server.url("/redirect")]
    assert Path(ok.path).read_bytes() == JPEG
    assert "HTTP 403" in entries[server.url("/forbidden")].detail


def test_bad_schemes_are_never_fetched(tmp_path: Path) -> None:
    downloader = ImageDownloader(settings(tmp_path / "cache"))
    bad = [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.jpg",
        "http:///nohost.jpg",
        "http://[::1/x.jpg",
        "http://" + "a" * 300 + ".example/x.jpg",
    ]
    try:
        entries = downloader.get_many(bad)
    finally:
        downloader.close()
    assert {e.reason for e in entries.values()} == {"download_bad_url"}
    stored = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
    # refused before any request and not stored; the long host name fails in the HTTP stack, remembered as permanent
    assert [(m["url"], m["reason"], m["retryable"]) for m in stored] == [(bad[-1], "download_bad_url", False)]


def test_retries_until_the_server_recovers_and_counts_attempts(server: Server, tmp_path: Path) -> None:
    import requests

    config = settings(tmp_path / "c1", retries=2)
    fetched = fetch_image(server.url("/flaky"), requests.Session(), config)
    assert fetched.data == JPEG and fetched.attempts == 3 and server.hits["/flaky"] == 3

    server.hits.clear()
    with pytest.raises(DownloadFailure) as failure:
        fetch_image(server.url("/flaky"), requests.Session(), settings(tmp_path / "c2", retries=1))
    assert failure.value.reason == "download_http_error" and failure.value.retryable
    assert server.hits["/flaky"] == 2

    slept: list[float] = []
    fetched = fetch_image(server.url("/busy"), requests.Session(), config, sleep=slept.append)
    assert fetched.data == PNG and slept == [0.0]  # the server's Retry-After: 0, not our back-off


def test_x_robots_tag_and_retry_after_parsing() -> None:
    from pipelines.image_download import _opted_out, _retry_after

    disallowed = {"noai", "noimageai"}
    assert _opted_out("noai", disallowed) == "noai"
    assert _opted_out("googlebot: noindex, otherbot: NoImageAI", disallowed) == "noimageai"
    assert _opted_out("noarchive, nofollow", disallowed) is None and _opted_out(None, disallowed) is None
    assert _opted_out("noai", set()) is None
    assert _retry_after("7") == 7.0 and _retry_after("soon") is None and _retry_after(None) is None
    later = _retry_after(email.utils.formatdate(time.time() + 120, usegmt=True))
    assert later is not None and 100 < later <= 121


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    config = DownloadConfig(backoff_s=1.0, max_backoff_s=5.0)
    rng = random.Random(0)
    for attempt, full in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        delays = [backoff_delay(attempt, config, None, rng) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not one fixed value
    assert backoff_delay(0, config, 3600.0, rng) == 5.0  # a Retry-After beyond the cap is capped
    assert backoff_delay(0, config, 2.0, rng) == 2.0


class EndlessBody:
    """A response body that never ends, counting the bytes asked for."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read1(self, amount: int, decode_content: bool = True) -> bytes:
        amount = min(amount, 5000)  # a socket read brings what has arrived
        self.read_bytes += amount
        return b"x" * amount


def test_the_size_limit_reads_at_most_one_byte_past_it() -> None:
    for limit in (1024, 100_000, 65536 * 3):
        body = EndlessBody()
        with pytest.raises(DownloadFailure) as failure:
            read_limited(body, limit, deadline=time.monotonic() + 60)
        assert failure.value.reason == "download_too_large" and body.read_bytes == limit + 1


def test_cache_holds_img2dataset_files_and_metadata_written_atomically(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    downloader = ImageDownloader(settings(cache))
    try:
        entries = downloader.get_many([server.url("/ok.jpg"), server.url("/ok.png"), server.url("/missing")])
    finally:
        downloader.close()
    key = cache_key(server.url("/ok.jpg"))
    image, meta_path = cache / key[:4] / f"{key}.jpg", cache / key[:4] / f"{key}.json"
    assert entries[server.url("/ok.jpg")].path == str(image) and image.read_bytes() == JPEG
    meta = json.loads(meta_path.read_text())
    img2dataset_keys = {
        "url",
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
    }
    assert img2dataset_keys <= set(meta)
    assert meta | {"exif": None} == meta | {
        "url": server.url("/ok.jpg"),
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 80,
        "height": 60,
        "original_width": 80,
        "original_height": 60,
        "sha256": hashlib.sha256(JPEG).hexdigest(),
    }
    png_key = cache_key(server.url("/ok.png"))
    assert (cache / png_key[:4] / f"{png_key}.png").read_bytes() == PNG
    failed_key = cache_key(server.url("/missing"))
    failed = json.loads((cache / failed_key[:4] / f"{failed_key}.json").read_text())
    assert failed["status"] == "failed_to_download" and failed["reason"] == "download_not_found"
    assert failed["retryable"] is False and "HTTP 404" in failed["error_message"]
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(".*"))


def test_a_second_run_fetches_only_what_failed_transiently(server: Server, tmp_path: Path) -> None:
    paths = ["/ok.jpg", "/ok.png", "/missing", "/page.html", "/always500", "/slow"]
    urls = [server.url(p) for p in paths]
    config = settings(tmp_path / "cache", retries=0)
    for _ in range(2):  # two workers (or runs), one cache
        downloader = ImageDownloader(config)
        try:
            entries = downloader.get_many(urls)
        finally:
            downloader.close()
    assert {p: server.hits[p] for p in paths} == {
        "/ok.jpg": 1,
        "/ok.png": 1,
        "/missing": 1,
        "/page.html": 1,
        "/always500": 2,
        "/slow": 2,
    }
    assert [entries[u].reason for u in urls] == [
        None,
        None,
        "download_not_found",
        "download_not_image",
        "download_http_error",
        "download_timeout",
    ]
    assert [entries[u].fetched for u in urls] == [False, False, False, False, True, True]


def test_a_damaged_or_colliding_cache_entry_is_fetched_again(server: Server, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    url = server.url("/ok.jpg")
    key = cache_key(url)
    cache.json_path(key).parent.mkdir(parents=True)
    for bad in ["{not json", json.dumps({"url": "http://other/", "status": "success", "file": f"{key}.jpg"})]:
        cache.json_path(key).write_text(bad)
        assert cache.lookup(url) is None
    downloader = ImageDownloader(settings(tmp_path / "cache"))
    try:
        assert downloader.get_many([url])[url].ok and server.hits["/ok.jpg"] == 1
    finally:
        downloader.close()
    (cache.json_path(key).with_name(f"{key}.jpg")).unlink()  # the image went missing: fetch again
    assert cache.lookup(url) is None


def test_concurrency_is_bounded_per_host(server: Server, tmp_path: Path) -> None:
    downloader = ImageDownloader(
        settings(tmp_path / "cache", concurrency=6, per_host=2, read_timeout_s=2.0, total_timeout_s=5.0)
    )
    try:
        entries = downloader.get_many(server.url(f"/slow-image?n={n}") for n in range(8))
    finally:
        downloader.close()
    assert all(e.ok for e in entries.values()) and server.hits["/slow-image"] == 8
    assert server.max_waiting == 2


def test_the_same_url_in_flight_twice_is_fetched_once(server: Server, tmp_path: Path) -> None:
    downloader = ImageDownloader(settings(tmp_path / "cache"))
    try:
        futures = [downloader.submit(server.url("/img0.jpg")) for _ in range(5)]
        assert len({f.result().path for f in futures}) == 1
    finally:
        downloader.close()
    assert server.hits["/img0.jpg"] == 1


def obelics(record_id: str, texts: list, urls: list) -> dict:
    return {
        "id": record_id,
        "texts": texts,
        "images": [None if u is None else image_ref(u, None) for u in urls],
        "metadata": None,
    }


def test_url_images_rewrites_refs_drops_failed_interleaved_images_and_reports(server: Server, tmp_path: Path) -> None:
    ok, missing = server.url("/ok.jpg"), server.url("/missing")
    items = [
        obelics("a", ["one", None, "two", None], [None, ok, None, missing]),  # keeps ok, drops missing
        Reject("docs", "b", "read", "bad_json", "passed through"),
        obelics("c", [None], [missing]),  # nothing left: rejected
        obelics("d", ["just text"], [None]),
    ]
    stage = UrlImages(settings(tmp_path / "cache"), "docs", "interleaved", report_dir=str(tmp_path / "out"))
    try:
        out = list(stage.resolve(items, shard_id=3))
    finally:
        stage.close()
    assert [o.record_id if isinstance(o, Reject) else o["id"] for o in out] == ["a", "b", "c", "d"]  # in order
    a, _, c, d = out
    assert a["texts"] == ["one", None, "two"] and a["images"][0] is None and a["images"][2] is None
    assert Path(a["images"][1]["path"]).read_bytes() == JPEG and a["images"][1]["url"] == ok
    assert (c.stage, c.reason) == ("download", "download_not_found") and "HTTP 404" in c.detail
    assert d == obelics("d", ["just text"], [None])
    report = json.loads((tmp_path / "out" / "shard-00003.downloads.json").read_text())
    assert report == {
        "count": 3,
        "successes": 1,
        "failed_to_download": 2,
        "failed_to_resize": 0,
        "status_dict": {"download_not_found": 2},
        "fetched": 1,
        "from_cache": 0,
        "images_dropped": 1,
        "records_rejected": 1,
    }
    assert server.hits["/missing"] == 1  # one fetch for both documents


def test_failed_image_reject_policy_and_pairs_and_sft(server: Server, tmp_path: Path) -> None:
    ok, missing = server.url("/ok.jpg"), server.url("/missing")
    strict = UrlImages(settings(tmp_path / "cache", failed_image="reject"), "docs", "interleaved")
    (doc,) = strict.resolve([obelics("a", ["one", None, None], [None, ok, missing])])
    strict.close()
    assert isinstance(doc, Reject) and doc.reason == "download_not_found"

    pairs = UrlImages(settings(tmp_path / "cache"), "pairs", "image_text")
    out = list(
        pairs.resolve(
            [
                {"id": "p1", "text": "cat", "image": image_ref(ok, None)},
                {"id": "p2", "text": "dog", "image": image_ref(missing, None)},
            ]
        )
    )
    pairs.close()
    assert Path(out[0]["image"]["path"]).read_bytes() == JPEG and out[1].reason == "download_not_found"

    sft = UrlImages(settings(tmp_path / "cache"), "chat", "sft")
    prompt = [{"text": "what is this?", "image": None}, {"text": None, "image": image_ref(server.url("/ok.png"), None)}]
    (sample,) = sft.resolve(
        [{"id": "s", "category": "visual_chat", "prompt": prompt, "answer": [{"text": "noise", "image": None}]}]
    )
    sft.close()
    assert Path(sample["prompt"][1]["image"]["path"]).read_bytes() == PNG


def test_with_downloads_off_a_url_is_image_not_local_with_a_hint(tmp_path: Path) -> None:
    for config in (None, DownloadConfig()):
        stage = UrlImages(config, "docs", "interleaved", report_dir=str(tmp_path))
        (out,) = stage.resolve([obelics("a", ["x", None], [None, "https://example.com/cat.jpg"])], shard_id=0)
        assert (out.reason, out.stage) == ("image_not_local", "read")
        assert "https://example.com/cat.jpg" in out.detail and "download.cache_dir" in out.detail


def test_image_refs_keep_http_urls_and_refuse_other_schemes() -> None:
    from pipelines.raw_records import RecordError

    assert image_ref("https://example.com/a.jpg", None) == {
        "bytes": None,
        "path": None,
        "url": "https://example.com/a.jpg",
    }
    assert image_ref({"url": "HTTP://example.com/a.jpg"}, None)["url"] == "HTTP://example.com/a.jpg"
    for value in ("s3://bucket/a.jpg", "ftp://host/a.jpg", "gs://b/a.jpg"):
        with pytest.raises(RecordError) as err:
            image_ref(value, None)
        assert err.value.reason == "image_not_local"


def test_config_refuses_per_host_above_concurrency() -> None:
    with pytest.raises(ValueError, match="per_host"):
        DownloadConfig(concurrency=2, per_host=4)
    assert not DownloadConfig().enabled and DownloadConfig().outcome_fingerprint() is None


def write_obelics_parquet(path: Path, docs: list[tuple[list, list]]) -> None:
    pq.write_table(pa.table({"texts": [t for t, _ in docs], "images": [i for _, i in docs]}), path)


def prepare_config(tmp_path: Path, tiny_tokenizers: dict, sources: list[dict], out: str, download: dict | None):
    from schemas import PrepareConfig, validate_config

    raw = {
        "output_dir": str(tmp_path / out),
        "image_size": 64,
        "samples_per_shard": 4,
        "detect_faces": False,
        "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
        "sources": sources,
    }
    if download is not None:
        raw["download"] = download
    return validate_config(PrepareConfig, raw)


def tokens_by_record(out_dir: Path) -> dict[str, tuple[list[int], list]]:
    from pipelines.shard_writer import read_shard

    samples = [s for tar in sorted(out_dir.glob("shard-*.tar")) for s in read_shard(tar)]
    return {s["meta"]["record_id"]: (s["tokens"].tolist(), s["meta"]["image_sizes"]) for s in samples}


@pytest.mark.slow
def test_prepare_fetches_obelics_mmc4_and_url_pairs_and_resumes(server: Server, tmp_path: Path, tiny_tokenizers):
    from pipelines.prepare_job import run_prepare

    u, imgs = server.url, server.images
    size = {p: Image.open(io.BytesIO(b)).size for p, b in imgs.items()}
    # The same documents twice: images by URL (as OBELICS and MMC4 publish them) and as local files.
    local = tmp_path / "local"
    local.mkdir()
    for p, data in imgs.items():
        (local / p.strip("/")).write_bytes(data)
    docs = [  # parallel texts / images, exactly one set at each position
        (["Intro text.", None, "Middle text.", None, "End text."], [None, "/img0.jpg", None, "/missing", None]),
        ([None, "A caption after its image."], ["/img1.jpg", None]),
        ([None], ["/missing"]),  # nothing left once its image fails: rejected
        (["Before.", None, "After."], [None, "/page.html", None]),
        (["Two images.", None, None], [None, "/img2.jpg", "/img3.jpg"]),
    ]
    by_url = [(t, [None if p is None else u(p) for p in i]) for t, i in docs]
    fetched = {"/img0.jpg", "/img1.jpg", "/img2.jpg", "/img3.jpg"}
    as_local = [
        (
            [x for x, p in zip(t, i, strict=True) if p is None or p in fetched],
            [None if p is None else str(local / p.strip("/")) for p in i if p is None or p in fetched],
        )
        for t, i in docs
    ]
    for folder, rows in (("web", by_url), ("disk", as_local)):
        (tmp_path / folder).mkdir()
        write_obelics_parquet(tmp_path / folder / "obelics.parquet", rows)
    mmc4 = [
        {
            "text_list": ["First sentence.", "Second sentence."],
            "image_info": [{"image_name": "not-downloaded.jpg", "raw_url": u("/img4.jpg"), "matched_text_index": 1}],
        },
        {
            "text_list": ["Only text here.", "And more."],
            "image_info": [
                {"raw_url": u("/gone"), "matched_text_index": 0},
                {"raw_url": u("/img5.jpg"), "matched_text_index": 1},
            ],
        },
    ]
    (tmp_path / "web" / "mmc4.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mmc4))
    pairs = pa.table({"url": [u("/img6.jpg"), u("/missing"), u("/huge")], "caption": ["six", "none", "big"]})
    pq.write_table(pairs, tmp_path / "web" / "pairs.parquet")

    sources = [
        {
            "name": "obelics",
            "kind": "interleaved",
            "format": "parquet",
            "paths": [str(tmp_path / "web/obelics.parquet")],
        },
        {"name": "mmc4", "kind": "interleaved", "format": "jsonl", "paths": [str(tmp_path / "web/mmc4.jsonl")]},
        {"name": "pairs", "kind": "image_text", "format": "parquet", "paths": [str(tmp_path / "web/pairs.parquet")]},
    ]
    download = settings(tmp_path / "cache").model_dump(mode="json")
    result = run_prepare(prepare_config(tmp_path, tiny_tokenizers, sources, "out", download))
    totals = {name: m["totals"] for name, m in result["manifests"].items()}
    for name, t in totals.items():
        assert t["records_in"] == t["samples"] + t["rejects"], name
    assert (totals["obelics"]["samples"], totals["obelics"]["rejects_by_reason"]) == (4, {"download_not_found": 1})
    assert (totals["mmc4"]["samples"], totals["mmc4"]["rejects"]) == (2, 0)
    assert totals["pairs"]["samples"] == 1
    assert totals["pairs"]["rejects_by_reason"] == {"download_not_found": 1, "download_too_large": 1}
    report = json.loads((tmp_path / "out/obelics/shard-00000.downloads.json").read_text())
    assert report["images_dropped"] == 2 and report["records_rejected"] == 1 and report["successes"] == 4
    assert report["status_dict"] == {"download_not_found": 2, "download_not_image": 1}
    manifests = result["manifests"]
    assert manifests["obelics"]["downloads"] | {"status_dict": None} == report | {"status_dict": None}  # one shard
    assert manifests["pairs"]["downloads"]["status_dict"] == {"download_not_found": 1, "download_too_large": 1}
    assert manifests["mmc4"]["downloads"]["images_dropped"] == 1

    # The fetched documents tokenize exactly as the same documents read from local files.
    disk = [
        {
            "name": "obelics",
            "kind": "interleaved",
            "format": "parquet",
            "paths": [str(tmp_path / "disk/obelics.parquet")],
        }
    ]
    run_prepare(prepare_config(tmp_path, tiny_tokenizers, disk, "out-disk", None))
    web_tokens, disk_tokens = (
        tokens_by_record(tmp_path / "out/obelics"),
        tokens_by_record(tmp_path / "out-disk/obelics"),
    )
    assert set(web_tokens) == {"obelics.parquet#0", "obelics.parquet#1", "obelics.parquet#3", "obelics.parquet#4"}
    assert web_tokens == {k: v for k, v in disk_tokens.items() if k in web_tokens}
    assert web_tokens["obelics.parquet#4"][1] == [list(size["/img2.jpg"]), list(size["/img3.jpg"])]
    mmc4_sizes = sorted(sizes for _, sizes in tokens_by_record(tmp_path / "out/mmc4").values())
    assert mmc4_sizes == [[list(size["/img4.jpg"])], [list(size["/img5.jpg"])]]  # /gone dropped, the doc kept

    # Another run into a new output folder with the same cache sends no request: images and permanent failures
    # come from the cache.
    hits = sum(server.hits.values())
    again = run_prepare(prepare_config(tmp_path, tiny_tokenizers, sources, "out-again", download))
    assert sum(server.hits.values()) == hits
    assert {n: m["totals"] for n, m in again["manifests"].items()} == totals
    assert tokens_by_record(tmp_path / "out-again/obelics") == web_tokens


def test_turning_downloads_on_redoes_shards_that_rejected_urls(server: Server, tmp_path: Path, tiny_tokenizers):
    from pipelines.prepare_job import run_prepare

    (tmp_path / "web").mkdir()
    write_obelics_parquet(tmp_path / "web/o.parquet", [(["A text.", None], [None, server.url("/img7.jpg")])])
    sources = [{"name": "o", "kind": "interleaved", "format": "parquet", "paths": [str(tmp_path / "web")]}]
    off = run_prepare(prepare_config(tmp_path, tiny_tokenizers, sources, "out", None))
    assert off["manifests"]["o"]["totals"]["rejects_by_reason"] == {"image_not_local": 1}
    assert server.hits["/img7.jpg"] == 0
    download = {"cache_dir": str(tmp_path / "c"), "allow_private_addresses": True}  # the server is on 127.0.0.1
    on = run_prepare(prepare_config(tmp_path, tiny_tokenizers, sources, "out", download))
    assert on["shards_written"] == {"o": 1} and on["manifests"]["o"]["totals"]["samples"] == 1
    assert server.hits["/img7.jpg"] == 1


def test_docs_explain_every_download_setting_and_reason() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    configs, prepare = (docs / "configs.md").read_text(), (docs / "prepare.md").read_text()
    for name in DownloadConfig.model_fields:
        assert f"`{name}`" in configs, f"docs/configs.md does not explain download.{name}"
    for reason in [r for r in REJECT_REASONS if r.startswith("download_")]:
        assert f"`{reason}`" in prepare, f"docs/prepare.md does not explain {reason}"


def test_a_run_killed_mid_write_leaves_nothing_that_looks_fetched(server: Server, tmp_path: Path) -> None:
    import pickle

    url = server.url("/ok.jpg")
    key = cache_key(url)
    folder = tmp_path / "cache" / key[:4]
    folder.mkdir(parents=True)
    (folder / f"{key}.jpg").write_bytes(JPEG[:100])  # the image renamed in place, its .json never written
    (folder / f".{key}.json.123.abcd.tmp").write_bytes(b'{"url": ')  # a temporary file cut short
    assert ImageCache(tmp_path / "cache").lookup(url) is None
    stage = UrlImages(settings(tmp_path / "cache"), "pairs", "image_text")
    stage.open()
    copy = pickle.loads(pickle.dumps(stage))  # as Beam ships a DoFn to its workers: without the live pool
    stage.close()
    assert copy.downloader is None and copy.config == stage.config
    try:
        (out,) = copy.resolve([{"id": "p", "text": "cat", "image": image_ref(url, None)}])
    finally:
        copy.close()
    assert Path(out["image"]["path"]).read_bytes() == JPEG and server.hits["/ok.jpg"] == 1
    assert json.loads((folder / f"{key}.json").read_text())["sha256"] == hashlib.sha256(JPEG).hexdigest()


def test_private_addresses_are_refused_by_default_before_any_request(server: Server, tmp_path: Path) -> None:
    port = server.httpd.server_address[1]
    urls = [
        server.url("/ok.jpg"),
        f"http://localhost:{port}/ok.jpg",
        f"http://[::1]:{port}/ok.jpg",
        f"http://2130706433:{port}/ok.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/ok.jpg",
        f"http://0.0.0.0:{port}/x",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/a.jpg",
        "http://192.168.0.1/a.jpg",
    ]
    strict = settings(tmp_path / "cache", allow_private_addresses=False)
    assert not DownloadConfig().allow_private_addresses  # the default
    downloader = ImageDownloader(strict)
    try:
        entries = downloader.get_many(urls)
    finally:
        downloader.close()
    assert {u: e.reason for u, e in entries.items()} == dict.fromkeys(urls, "download_private_address")
    assert "download.allow_private_addresses" in entries[urls[0]].detail
    assert sum(server.hits.values()) == 0  # refused after resolving, before connecting: nothing sent
    assert not list((tmp_path / "cache").rglob("*.json"))  # the settings' verdict is not remembered as the URL's
    downloader = ImageDownloader(settings(tmp_path / "cache"))  # allowed: the same URL is fetched
    try:
        assert downloader.get_many(urls[:1])[urls[0]].ok and server.hits["/ok.jpg"] == 1
    finally:
        downloader.close()


def test_a_redirect_to_a_private_address_is_refused_at_that_hop(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.image_download as image_download

    # A second server stands for a public host: 127.0.0.2 is treated as public, every other address as it is.
    public = Server("127.0.0.2")
    monkeypatch.setattr(image_download, "address_is_public", lambda address: address == "127.0.0.2")
    port = server.httpd.server_address[1]
    targets = [server.url("/ok.jpg"), f"http://localhost:{port}/ok.jpg", "http://169.254.169.254/latest/meta-data/"]
    urls = [public.url(f"/redirect-to?{target}") for target in targets]
    downloader = ImageDownloader(settings(tmp_path / "cache", allow_private_addresses=False))
    try:
        entries = downloader.get_many([*urls, public.url("/redirect")])
    finally:
        downloader.close()
        public.close()
    assert [entries[u].reason for u in urls] == ["download_private_address"] * 3
    assert public.hits["/redirect-to"] == 3 and sum(server.hits.values()) == 0
    ok = entries[public.url("/redirect")]  # a redirect that stays on the public host is followed
    assert ok.ok and Path(ok.path).read_bytes() == JPEG and public.hits["/ok.jpg"] == 1


def test_no_netrc_credentials_or_environment_proxy_reach_hosts_named_in_data(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password secret\ndefault login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a proxy that is not there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    downloader = ImageDownloader(settings(tmp_path / "cache"))
    try:
        entries = downloader.get_many([server.url("/ok.jpg"), server.url("/redirect-to?/ok.png")])
    finally:
        downloader.close()
    assert all(e.ok for e in entries.values()), entries  # fetched directly, not through the proxy
    assert server.hits["/ok.jpg"] == 1 and server.hits["/ok.png"] == 1
    assert server.authorization == []  # neither on the first request nor after the redirect


def test_the_download_leaves_pixel_limits_to_the_image_step() -> None:
    """A 200 MP image (above Pillow's own ~179 MP bomb error) is fetched and cached as what it is: whether it is too
    large is the source's `max_pixels` to say, at the image step, and a larger limit lets it through."""
    from model.tokenizers.image_preprocess import ImageError, open_image

    buffer = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, "PNG")  # a few kB on the wire
    data = buffer.getvalue()
    assert inspect_image(data) | {"exif": None} == {"format": "PNG", "width": 20_000, "height": 10_000, "exif": None}
    with pytest.raises(ImageError) as refused:
        open_image(data)
    assert refused.value.reason == "image_too_large"
    assert open_image(data, max_pixels=300_000_000).size == (20_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's guard is back where it was
