"""Headless Chromium against the dashboard: run the browser, read the rendered charts."""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Charts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, int] = {}
        self.banner_style: str | None = None
        self.ready = ""
        self._in_ready = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-chart"):
            self.points[str(a["data-chart"])] = int(a.get("data-points") or 0)
        if a.get("id") == "banner":
            self.banner_style = a.get("style") or ""
        self._in_ready = a.get("id") == "ready"

    def handle_data(self, data: str) -> None:
        if self._in_ready:
            self.ready += data.strip()
            self._in_ready = False


async def chromium(url: str, profile: Path, *extra: str) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--no-first-run", "--disable-extensions",
        "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
        f"--user-data-dir={profile}", "--window-size=1400,1000",
        "--virtual-time-budget=8000", *extra, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace"), err.decode(errors="replace")
