"""A short soak of the real server process (demos/soak.py): SIGTERM exits 0, memory flat after
warm-up, no per-step data kept (stats reply, logs, checkpoint files), finite outputs."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "policies" / "guessing-nonstationary-v2.onnx"

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status"),
              pytest.mark.skipif(not POLICY.exists(), reason="needs the shipped policy")]


def test_short_soak_passes_its_checks(tmp_path, monkeypatch, capsys):
    for k in [k for k in os.environ if k.startswith("BADGER_")]:
        monkeypatch.delenv(k)
    soak = runpy.run_path(str(ROOT / "demos" / "soak.py"))
    png = tmp_path / "soak.png"
    # 1 session x 2,000 steps, then 2 sessions x 1,000 steps at once
    r = soak["main"](["--policy", str(POLICY), "--steps", "2000", "--sessions", "2", "--window", "200",
                      "--max-seconds", "60", "--max-growth-mib", "20", "--plot", str(png)])
    assert r["ok"], r["checks"]
    assert all(r["checks"].values())
    assert r["server"]["exit_code"] == 0
    assert r["steps"] == 4000 and [p["steps"] for p in r["phases"]] == [2000, 2000]
    assert [p["sessions"] for p in r["phases"]] == [1, 2]
    assert r["growth"]["growth_mib"] < 20 and r["growth"]["warmup_steps"] == 400
    sb = r["stats_reply_bytes"]
    assert sb["same_structure"] and sb["after_steps"] == 1000 and abs(sb["end"] - sb["early"]) <= 256
    assert r["state_dir"]["checkpoints"] == r["state_dir"]["sessions"] == 3
    assert r["state_dir"]["other_files"] == [] and r["state_dir"]["checkpoint_t_matches"]
    assert r["server"]["log_lines_added_while_stepping"] == 0
    assert r["server"]["counters"]["steps"] == 4000
    # checkpoint every 100 steps: 3 opens + 4,000 / 100 step checkpoints, nothing pending at SIGTERM
    assert r["server"]["counters"]["checkpoint.writes"] == 3 + 40
    assert r["nonfinite_outputs"] == 0
    rows = r["windows"]
    assert rows[0]["steps"] == 0 and rows[-1]["steps"] == 4000 and len(rows) == 1 + 4000 // 200
    assert all(w["p99_ms"] is not None and w["p99_ms"] >= w["p50_ms"] > 0 for w in rows[1:])
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert out.startswith("{") and '"ok": true' in out
