"""Rules reload without a restart when their file changes; a broken edit keeps the old ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stream.runtime import RULES_CHECK_S, ScoringRuntime
from stream.settings import load_settings

RULES = """
schemes:
  spend:
    segments:
      - {name: High, when: "spend_30d >= %s"}
    fallback: Low
"""


def test_rules_file_changes_are_picked_up_and_bad_edits_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES % 100)
    clock = [1_000.0]
    s = load_settings(rules_path=path)
    rt = ScoringRuntime(s, None, None, clock=lambda: clock[0])  # type: ignore[arg-type]
    v1 = rt.catalogue.version
    loaded: list[tuple[str, str]] = []
    refused: list[None] = []
    rt.on_rules = lambda cat, acts: loaded.append((cat, acts))
    rt.on_rules_refused = lambda: refused.append(None)

    path.write_text(RULES % 250)
    os.utime(path, (clock[0] + 5, clock[0] + 5))
    clock[0] += RULES_CHECK_S + 1
    asyncio.run(rt._maybe_reload_rules(clock[0]))
    assert rt.catalogue.version != v1
    assert "250" in rt.catalogue.schemes["spend"].segments[0].when
    assert not rt.published_rules  # the new version is announced on the next refresh
    assert loaded == [(str(rt.catalogue.version), str(rt.actions.version))] and not refused

    v2 = rt.catalogue.version
    path.write_text(RULES.replace("spend_30d", "no_such_feature") % 1)
    os.utime(path, (clock[0] + 10, clock[0] + 10))
    clock[0] += RULES_CHECK_S + 1
    asyncio.run(rt._maybe_reload_rules(clock[0]))
    assert rt.catalogue.version == v2  # an invalid file never replaces valid rules
    assert len(refused) == 1 and len(loaded) == 1  # counted once per refused edit
    clock[0] += RULES_CHECK_S + 1
    asyncio.run(rt._maybe_reload_rules(clock[0]))
    assert len(refused) == 1
