"""The autoscaler's policy: how many workers, when to add and remove them,
and the back-off after failed starts."""

import logging

import pytest
from sqlalchemy import func, select

from queue_engine import leadership
from queue_engine.db import transaction
from queue_engine.errors import SettingsError
from queue_engine.models import ScalingState, WorkerAllocation
from queue_engine.scaling import backoff_delay, decide, desired_workers
from queue_engine.settings import SlurmProfile, load_settings
from slurm.autoscaler import Autoscaler

PROFILE = SlurmProfile(min_workers=0, max_workers=4, target_backlog_per_worker=100)


@pytest.mark.parametrize("backlog, desired", [(0, 0), (1, 1), (100, 1), (101, 2), (400, 4), (10_000, 4)])
def test_desired_is_the_backlog_over_the_target_clamped_to_min_and_max(backlog, desired):
    assert desired_workers(backlog, PROFILE) == desired


def test_min_workers_stay_even_with_nothing_to_do():
    assert desired_workers(0, SlurmProfile(min_workers=2, max_workers=4)) == 2


def test_scale_up_submits_the_difference_at_once_counting_pending_jobs():
    decision = decide(backlog=350, workers=1, slurm=PROFILE, idle_for=None, idle_grace=120)
    assert (decision.action, decision.desired, decision.change) == ("up", 4, 3)
    assert "submitting 3" in decision.reason


def test_jobs_already_submitted_are_not_submitted_again():
    decision = decide(backlog=10_000, workers=4, slurm=PROFILE, idle_for=None, idle_grace=120)
    assert (decision.action, decision.change) == ("hold", 0)


def test_no_scale_down_while_work_remains():
    decision = decide(backlog=5, workers=4, slurm=PROFILE, idle_for=None, idle_grace=0)
    assert decision.action == "hold" and "still waiting" in decision.reason


def test_no_scale_down_before_the_idle_grace_has_passed():
    decision = decide(backlog=0, workers=3, slurm=PROFILE, idle_for=119, idle_grace=120)
    assert decision.action == "hold" and "119 s of the 120 s grace" in decision.reason


def test_after_the_idle_grace_every_worker_above_min_is_stopped():
    decision = decide(backlog=0, workers=3, slurm=SlurmProfile(min_workers=1), idle_for=120, idle_grace=120)
    assert (decision.action, decision.desired, decision.change) == ("down", 1, 2)


def test_a_running_back_off_holds_submissions():
    decision = decide(backlog=500, workers=0, slurm=PROFILE, idle_for=None, idle_grace=120, failures=2, retry_in=8)
    assert (decision.action, decision.change) == ("wait", 0)
    assert "2 failed starts" in decision.reason and "8 s" in decision.reason


def test_after_failures_replacements_go_one_at_a_time():
    decision = decide(backlog=500, workers=0, slurm=PROFILE, idle_for=None, idle_grace=120, failures=2, retry_in=0)
    assert (decision.action, decision.change) == ("up", 1)


def test_back_off_doubles_per_failure_up_to_the_cap():
    assert [backoff_delay(n, base=5, cap=60) for n in range(7)] == [0, 5, 10, 20, 40, 60, 60]


def test_after_failures_nothing_more_is_submitted_while_a_replacement_is_on_its_way_up():
    decision = decide(backlog=500, workers=1, slurm=PROFILE, idle_for=None, idle_grace=120, failures=2, retry_in=0,
                      unproven=1)
    assert (decision.action, decision.change) == ("wait", 0)
    assert "waiting for the 1 starting to serve" in decision.reason


def test_autoscaler_settings_lease_and_stop_grace_defaults_and_a_lease_shorter_than_the_interval_is_refused(tmp_path):
    """leader_ttl 15 s (three intervals), stop_grace 600 s; a lease that would run out between renewals is an error."""
    autoscaler = load_settings(environ={}, data_dir=tmp_path).autoscaler
    assert (autoscaler.leader_ttl, autoscaler.stop_grace) == (15.0, 600.0)
    with pytest.raises(SettingsError, match=r"leader_ttl \(10 s\) must be longer than interval \(10 s\)"):
        load_settings(environ={}, data_dir=tmp_path, autoscaler={"interval": 10, "leader_ttl": 10})


def test_a_standby_autoscaler_touches_neither_slurm_nor_the_database(sessions, database_url, tmp_path, caplog):
    """While another holds the deployment's lease, a step does nothing (its SLURM client is None here: any
    call would raise), says once that it stands by and for whom, and a round begun as leader stops."""
    caplog.set_level(logging.INFO, logger="slurm.autoscaler")
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url,
                             autoscaler={"deployment": "dep"}, models={"m": {"slurm": {}}})
    with transaction(sessions) as session:
        assert leadership.acquire(session, "autoscaler:dep", "other-host:1:ab", 60)
    scaler = Autoscaler(settings, sessions, slurm=None)
    assert not scaler.step() and not scaler.step()
    assert not scaler.scale("m", {})  # as if it had lost the lease after the step began
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ScalingState)) == 0
        assert session.scalar(select(func.count()).select_from(WorkerAllocation)) == 0
    standing_by = [r.getMessage() for r in caplog.records if "standing by" in r.getMessage()]
    assert len(standing_by) == 1 and standing_by[0].startswith("standing by: other-host:1:ab leads deployment 'dep'")
