"""Screenshots of every page of the web dashboard, for docs/web.md.

Serves the demo's job history (run ``make run`` first: it writes ``demo/keepwell.yaml`` and
leaves ``demo/history.db``) with a real ``keepwell web`` process, loads each page in Debian's
Chromium driven by Playwright (the dev extra) at 1000 px wide, waits for its plots, and saves
``docs/images/web-PAGE.png``. Chromium's PNG is then recompressed losslessly (its image data
deflated again at zlib's best level), which makes the files smaller without changing a pixel.

Usage: bench/web_screenshots.py [--config demo/keepwell.yaml] [--out docs/images]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
WIDTH = 1000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recompress_png(data: bytes) -> bytes:
    """The same image with its IDAT chunks joined and deflated again at level 9."""
    if not data.startswith(PNG_MAGIC):
        raise ValueError("not a PNG")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_MAGIC)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    packed = zlib.compress(raw, 9)
    out = [PNG_MAGIC]
    wrote_idat = False
    for kind, body in chunks:
        if kind == b"IDAT":
            if wrote_idat:
                continue
            kind, body, wrote_idat = b"IDAT", packed, True
        out.append(struct.pack(">I", len(body)) + kind + body
                   + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    smaller = b"".join(out)
    return smaller if len(smaller) < len(data) else data


def start_web(config: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``keepwell web`` process on a free loopback port, and its address (also used by
    bench/web_bench.py)."""
    logf = open(log, "wb")  # noqa: SIM115 - open while the process runs
    proc = subprocess.Popen([sys.executable, "-m", "keepwell.cli.main", "web", "-c", config,
                             "--listen", "127.0.0.1:0", "--log-json"],
                            stdout=logf, stderr=logf)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "web_listening":
                return proc, str(event["address"])
        if proc.poll() is not None:
            raise SystemExit(f"keepwell web exited: {log.read_text().strip()}")
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit("keepwell web did not start within 60 s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo/keepwell.yaml")
    ap.add_argument("--out", default="docs/images")
    args = ap.parse_args()
    if not Path(args.config).exists():
        print(f"no {args.config}: run `make run` first", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, base = start_web(args.config, out / ".web.log")
    try:
        import urllib.request

        with urllib.request.urlopen(base + "/api/v1/overview") as resp:
            overview = json.load(resp)
        with urllib.request.urlopen(base + "/api/v1/runs?limit=1&action=backup") as resp:
            last = json.load(resp)
        source = overview["sources"][0]["source"]
        repo = overview["sources"][0]["repository"]
        pages = {"overview": "/", "source": f"/sources/{source}", "repository":
                 f"/repositories/{repo}", "drills": "/drills", "running": "/running"}
        if last:
            pages["run"] = f"/runs/{last[0]['id']}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": WIDTH, "height": 700})
            for name, path in pages.items():
                page.goto(base + path)
                if page.locator(".plot[data-plot]").count():
                    page.wait_for_selector(".plot[data-drawn='1']")
                if name == "running":
                    page.wait_for_selector("#live-state[data-updates]")
                target = out / f"web-{name}.png"
                png = recompress_png(page.screenshot(full_page=True))
                tmp = target.with_suffix(".png.tmp")
                tmp.write_bytes(png)
                os.replace(tmp, target)
                print(f"{target}: {len(png) // 1024} KiB")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        (out / ".web.log").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
