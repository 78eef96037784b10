"""The time budget of tests/gpu_check.sh, checked without a GPU.

The script is sourced in bash (sourced, it defines its functions and runs
nothing) with its clock replaced, and asked what each stage would get:
- stage_budget gives min(cap, time left - what is kept for later stages), and
  refuses (no output, status 1) below the stage's minimum, so no stage is ever
  started with a second or two and then reported as a failure;
- every stage_budget call of the script, at every time left from 0 to the
  whole budget, either refuses or grants at least its own minimum and at most
  its cap and the time left;
- a refused stage is a SKIP line of the table that says why (the seconds left
  for it, what is kept for later stages, what it needs), and a SKIP does not
  fail the run.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(body: str) -> subprocess.CompletedProcess:
    """`body` after sourcing the script, with `left` answering $FAKE_LEFT."""
    script = f"source {SCRIPT}\nleft() {{ echo \"$FAKE_LEFT\"; }}\nelapsed() {{ echo 0; }}\n{body}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def _budget(left: int, cap: int, minimum: int, reserve: int = 0) -> str | None:
    r = _bash(f"FAKE_LEFT={left}\nstage_budget {cap} {minimum} {reserve}")
    assert r.returncode in (0, 1), r.stderr
    return r.stdout.strip() if r.returncode == 0 else None


def test_sourcing_runs_nothing(tmp_path):
    r = subprocess.run(["bash", "-c", f"OUT={tmp_path}/out; source {SCRIPT}; echo sourced"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "sourced\n", r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_stage_budget_caps_keeps_reserve_and_refuses_below_the_minimum():
    assert _budget(400, 200, 60) == "200"          # capped
    assert _budget(100, 200, 60) == "100"          # what is left
    assert _budget(300, 200, 60, 200) == "100"     # left minus what later stages keep
    assert _budget(250, 200, 60, 200) is None      # 50 s < 60 s: not started
    assert _budget(60, 200, 60) == "60"            # exactly the minimum runs
    assert _budget(59, 200, 60) is None
    assert _budget(0, 120, 40) is None
    assert _budget(-30, 120, 40, 10) is None       # past the deadline


def _script_calls() -> list[tuple[int, int, int]]:
    calls = re.findall(r"stage_budget (\d+) (\d+)(?: (\d+))?", SCRIPT.read_text())
    return [(int(c), int(m), int(r or 0)) for c, m, r in calls]


def test_no_stage_of_the_script_gets_less_than_its_minimum():
    calls = _script_calls()
    assert len(calls) >= 7, calls                  # build, retry, ops, model, family, parity, bench
    lefts = list(range(-5, 520, 7))
    body = "\n".join(f"FAKE_LEFT={left}; for c in {' '.join(f'{c},{m},{r}' for c, m, r in calls)}; "
                     f"do IFS=, read cap min res <<< \"$c\"; "
                     f"echo \"{left} $cap $min $res $(stage_budget $cap $min $res || echo -)\"; done"
                     for left in lefts)
    r = _bash(body)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert len(rows) == len(lefts) * len(calls)
    for left, cap, minimum, reserve, got in rows:
        left, cap, minimum, reserve = int(left), int(cap), int(minimum), int(reserve)
        assert minimum >= 20, rows                 # every stage has a real minimum
        if got == "-":
            assert min(cap, left - reserve) < minimum
        else:
            assert minimum <= int(got) <= min(cap, left - reserve), (left, cap, minimum, reserve, got)


def test_a_stage_refused_for_time_is_a_skip_line_that_says_why():
    r = _bash("FAKE_LEFT=70\nBUDGET=500\nSUMMARY=()\n"
              "if ! b=$(stage_budget 200 60 100); then skip_for_time model 60 100; fi\n"
              "if ! b=$(stage_budget 600 60 10); then skip_for_time bench 60 10; fi\n"
              "printf '%s\\n' \"${SUMMARY[@]}\"\n"
              "printf '%s\\n' \"${SUMMARY[@]}\" | grep -qE '^[a-z0-9]+ +FAIL' && echo failed || echo passed")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "SKIP"]
    assert "0 s of the 500 s budget left for it (100 s kept for later stages), it needs >= 60 s" \
        in lines[0]
    assert len(lines) == 2 and lines[1] == "passed"  # the bench (60 s left) still ran: no line
