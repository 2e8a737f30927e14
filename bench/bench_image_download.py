"""Image download throughput against a server on 127.0.0.1: one download at a time vs many in flight.

The server answers every image after `--latency-ms` (a remote server's round trip and time to first byte, which is
what concurrency hides; loopback has none of its own). Each row fetches the same distinct URLs into a fresh cache
with `ImageDownloader` (the prepare job's download stage); the last row reads them back from the warm cache, which
sends no request. Prints images/s per row and the ratio of the concurrent rows to the sequential one.

`PYTHONPATH=. python bench/bench_image_download.py [--quick] [--images N] [--latency-ms MS] [--concurrency N]`;
with OUT set, also writes $OUT/bench_image_download.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.image_download import ImageDownloader
from schemas.download_config import DownloadConfig


def jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)).repeat(8, 0).repeat(8, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_server(body: bytes, latency_s: float) -> tuple[ThreadingHTTPServer, Counter]:
    hits: Counter = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body in two writes: no delayed-ACK stalls

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            with lock:
                hits[self.path] += 1
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, hits


def fetch_all(urls: list[str], cache: Path, concurrency: int, per_host: int) -> tuple[float, int]:
    """Seconds to fetch every URL, and how many came back as images."""
    config = DownloadConfig(
        cache_dir=str(cache), concurrency=concurrency, per_host=per_host, retries=0, allow_private_addresses=True
    )  # the server is on 127.0.0.1
    downloader = ImageDownloader(config)
    started = time.perf_counter()
    try:
        entries = downloader.get_many(urls)
    finally:
        downloader.close()
    return time.perf_counter() - started, sum(e.ok for e in entries.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--side", type=int, default=256, help="served JPEG side in px")
    parser.add_argument("--quick", action="store_true", help="a few dozen images: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.images, args.latency_ms = 48, 20.0
    body = jpeg(args.side, 0)
    server, hits = start_server(body, args.latency_ms / 1000)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img/{n}.jpg" for n in range(args.images)]
    n = args.concurrency
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("sequential", 1, 1, "seq"),
            (f"concurrency {n}, per host {n}", n, n, "par"),
            (f"concurrency {n}, per host 4 (default)", n, min(4, n), "host4"),
            (f"warm cache (concurrency {n})", n, n, "par"),
        ]
        for label, concurrency, per_host, cache in runs:
            before = sum(hits.values())
            seconds, ok = fetch_all(urls, Path(tmp) / cache, concurrency, per_host)
            rows.append(
                {
                    "what": label,
                    "concurrency": concurrency,
                    "per_host": per_host,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(len(urls) / seconds, 1),
                    "ok": ok,
                    "requests": sum(hits.values()) - before,
                }
            )
    server.shutdown()
    server.server_close()
    print(f"{len(urls)} images of {len(body)} bytes, {args.latency_ms:g} ms server latency, 127.0.0.1")
    print(f"{'run':<40} {'images/s':>9} {'requests':>9} {'ok':>5}")
    for row in rows:
        print(f"{row['what']:<40} {row['images_per_s']:>9.1f} {row['requests']:>9} {row['ok']:>5}")
    sequential = rows[0]["images_per_s"]
    ratios = {row["what"]: round(row["images_per_s"] / sequential, 2) for row in rows[1:3]}
    for what, ratio in ratios.items():
        print(f"{what} / sequential: {ratio:.2f}x")
    out = os.environ.get("OUT")
    if out:
        result = {
            "images": len(urls),
            "bytes": len(body),
            "latency_ms": args.latency_ms,
            "rows": rows,
            "ratios": ratios,
        }
        Path(out, "bench_image_download.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
