"""Stop before the wall clock does (megadrp/runtime/deadline.py)."""
from __future__ import annotations

import pytest

from megadrp.errors import ConfigError
from megadrp.runtime.deadline import SAFETY_SECONDS, Deadline, parse_duration
from megadrp.runtime.stop import StopRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90:00", 5400), ("1:30:00", 5400), ("2-00", 172800),
                                           ("2-01:30", 178200), ("1-00:00:10", 86410), (" 60 ", 60)])
def test_durations_in_slurms_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "x", "1:2:3:4", "-5", "1h"])
def test_bad_durations_name_the_flag(bad):
    with pytest.raises(ConfigError, match="--time-limit"):
        parse_duration(bad)


def test_where_the_end_comes_from():
    assert Deadline.find("60", {}, now=1000.0).end == 1060.0  # --time-limit wins
    env = {"SLURM_JOB_END_TIME": "5000", "MEGADRP_JOB_END_TIME": "4000"}
    assert Deadline.find(None, env).end == 5000.0 and Deadline.find(None, env).source == "SLURM_JOB_END_TIME"
    assert Deadline.find(None, {"MEGADRP_JOB_END_TIME": "4000"}).end == 4000.0
    assert Deadline.find(None, {"SLURM_JOB_END_TIME": "0"}).end is None  # Slurm's "no limit"
    assert Deadline.find(None, {}).end is None and not Deadline(None).too_close(1e9)


def test_too_close_leaves_room_for_the_work_and_a_margin():
    d = Deadline(1000.0)
    assert not d.too_close(20, now=1000.0 - 20 - SAFETY_SECONDS - 1)
    assert d.too_close(20, now=1000.0 - 20 - SAFETY_SECONDS + 1)


def test_a_deadline_stop_is_a_stop_at_a_checkpoint():
    s = StopRequest()
    s.request("the job ends")
    assert s.signum and s.exit_code == 3
