"""``segstream demo`` as a user runs it: worker, replay, live feed, summary, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, SEGSTREAM, Deployment, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIGRATION_LINE = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}  s\d{6}  (rfm|lifecycle)  .+ → ", re.MULTILINE)


def workers_of(app_id: str) -> list[int]:
    """Pids of live ``segstream worker`` processes of this deployment."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmd and f"SEGSTREAM_APP_ID={app_id}".encode() in env:
            found.append(int(d.name))
    return found


def kill_workers(app_id: str) -> None:
    for pid in workers_of(app_id):
        os.killpg(pid, signal.SIGKILL)


def demo_env(deployment: Deployment, tmp_path: Path) -> tuple[dict[str, str], int]:
    port = _free_port()
    env = dict(deployment.env, SEGSTREAM_WEB_PORT=str(port), SEGSTREAM_DATA_DIR=str(tmp_path),
               COLUMNS="200")
    return env, port


def test_demo_replays_shows_migrations_and_stops(deployment: Deployment, tmp_path: Path) -> None:
    env, port = demo_env(deployment, tmp_path)
    app_id = env["SEGSTREAM_APP_ID"]
    try:
        proc = subprocess.run(
            [*SEGSTREAM, "demo", "--duration", "40", "--customers", "200", "--rate", "3000",
             "--no-cdnow"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        left = workers_of(app_id)
        kill_workers(app_id)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"http://127.0.0.1:{port}/" in out
    assert MIGRATION_LINE.search(out), out[-4000:]
    assert "replay done: " in out
    assert "segments as of" in out
    assert "Traceback" not in out
    assert not left, f"worker processes left running: {left}"
    assert (tmp_path / "demo" / f"{app_id}-worker.log").exists()


def test_ctrl_c_mid_replay_stops_cleanly(deployment: Deployment, tmp_path: Path) -> None:
    env, _ = demo_env(deployment, tmp_path)
    app_id = env["SEGSTREAM_APP_ID"]
    out_path = tmp_path / "demo.out"
    # About 23,000 events at 500/s: the replay is still running at the first migration.
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [*SEGSTREAM, "demo", "--customers", "2000", "--rate", "500", "--no-cdnow"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not MIGRATION_LINE.search(out_path.read_text(errors="replace")):
            assert proc.poll() is None, out_path.read_text()[-4000:]
            assert time.monotonic() < deadline, out_path.read_text()[-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = workers_of(app_id)
        kill_workers(app_id)
    text = out_path.read_text(errors="replace")
    assert code in (0, 130), text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "replay done" not in text  # it really was mid-replay
    assert "worker stopped" in text
    assert not left, f"worker processes left running: {left}"
