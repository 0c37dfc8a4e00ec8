"""The tribunal's state machine, on SQLite and PostgreSQL: which steps follow
which, what each step is asked, and what failure and cancel do.

Steps are run here the way a worker runs them (claim, then finish the step,
which schedules the steps that follow in the same transaction), with the
generated text given.
Real workers run tribunals in ``tests/integration/test_tribunals.py``.
"""

import threading

import pytest
from sqlalchemy import select

from queue_engine import jobs, recovery, tribunal
from queue_engine.db import transaction
from queue_engine.errors import InvalidRequestError, NoSuchJobError
from queue_engine.models import Job, utcnow
from queue_engine.schemas import TribunalCreate
from queue_engine.settings import ModelProfile, load_settings
from tests.conftest import make_key
from tests.unit.test_recovery import expire_lease
from tests.work import claim_job, reject, succeed

FULL = tribunal.Decision(False)


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


@pytest.fixture
def settings(tmp_path, database_url):
    models = {"tiny-b": ModelProfile(path="tiny", engine_args={"max_model_len": 256, "seed": 1})}
    return load_settings(environ={}, data_dir=tmp_path, database_url=database_url, models=models)


def new_tribunal(sessions, settings, owner, decision=FULL, **fields):
    body = {"prompt": "What is a list?", "candidates": ["tiny", "tiny-b"], "judge": "tiny-b", "bypass": "never",
            **fields}
    with transaction(sessions) as session:
        job, steps, created = tribunal.create_tribunal(
            session, owner, TribunalCreate.model_validate(body), settings, decision)
    return job, steps


def run_step(sessions, settings, step_id, text=None, worker="w1", fail=None):
    """Claim a step and finish it as a worker does; returns the steps that follow (as stored)."""
    with transaction(sessions) as session:
        assert claim_job(session, step_id, worker) is not None, f"step {step_id} could not be claimed"
    with transaction(sessions) as session:
        if fail:
            finished = reject(session, settings, step_id, fail, worker)
        else:
            finished = succeed(session, settings, step_id, worker, text or f"answer of {step_id}", "stop", 10, 5)
    assert finished.ended == [step_id]
    return [reload(sessions, next_id) for next_id, _ in finished.next_jobs]


def reload(sessions, job_id):
    with sessions() as session:
        return session.get(Job, job_id)


def steps_of(sessions, job_id):
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.created_at, Job.id)))


def test_candidates_are_queued_one_per_listed_model_with_their_own_seeds(sessions, settings, owner):
    """Each candidate is a queued step on its model's queue; a model listed twice gets another seed."""
    job, steps = new_tribunal(sessions, settings, owner, candidates=["tiny", "tiny-b", "tiny"], params={"seed": 40})
    assert (job.kind, job.status, job.model) == ("tribunal", "queued", "tiny")
    assert [(s.step, s.model, s.row_index, s.params["seed"]) for s in steps] == [
        ("candidate", "tiny", 0, 40), ("candidate", "tiny-b", 1, 41), ("candidate", "tiny", 2, 42)]
    assert all(s.prompt == "What is a list?" and s.lane == "interactive" and s.status == "queued" for s in steps)
    trace = job.tribunal
    assert [c["seed"] for c in trace["candidates"]] == [40, 41, 42]
    assert (trace["judge"], trace["reviser"], trace["bypassed"], trace["final"]) == ("tiny-b", "tiny-b", False, None)


def test_full_run_candidates_then_critique_then_revision(sessions, settings, owner):
    """The judge sees the question and every answer; the reviser also sees the critique; usage adds up."""
    job, candidates = new_tribunal(sessions, settings, owner, reviser="tiny")
    assert run_step(sessions, settings, candidates[0].id, "A list is mutable.") == []
    assert reload(sessions, job.id).status == "running"
    [critique] = run_step(sessions, settings, candidates[1].id, "A list holds items.")
    assert (critique.step, critique.model) == ("critique", "tiny-b")
    for expected in ("What is a list?", "Answer 1:\nA list is mutable.", "Answer 2:\nA list holds items."):
        assert expected in critique.prompt

    [revision] = run_step(sessions, settings, critique.id, "Answer 2 misses mutability.")
    assert (revision.step, revision.model) == ("revision", "tiny")
    for expected in ("What is a list?", "A list is mutable.", "A list holds items.", "Answer 2 misses mutability."):
        assert expected in revision.prompt

    assert run_step(sessions, settings, revision.id, "A list is a mutable sequence.") == []
    done = reload(sessions, job.id)
    assert (done.status, done.result_text, done.finish_reason) == ("succeeded", "A list is a mutable sequence.", "stop")
    assert (done.prompt_tokens, done.completion_tokens) == (4 * 10, 4 * 5)
    body = jobs.job_to_dict(done)
    assert body["tribunal"]["candidates"] == [
        {"model": "tiny", "seed": done.tribunal["candidates"][0]["seed"], "text": "A list is mutable."},
        {"model": "tiny-b", "seed": done.tribunal["candidates"][1]["seed"], "text": "A list holds items."},
    ]
    assert (body["tribunal"]["critique"], body["tribunal"]["final"]) == (
        "Answer 2 misses mutability.", "A list is a mutable sequence.")
    assert body["result"]["text"] == body["tribunal"]["final"]


def test_chat_questions_reach_the_judge_as_lines_in_one_user_message(sessions, settings, owner):
    job, candidates = new_tribunal(sessions, settings, owner, prompt=None, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a dict?"}])
    assert candidates[0].messages[1]["content"] == "What is a dict?"
    run_step(sessions, settings, candidates[0].id)
    [critique] = run_step(sessions, settings, candidates[1].id)
    assert critique.prompt is None and [m["role"] for m in critique.messages] == ["user"]
    assert "system: Be brief.\nuser: What is a dict?" in critique.messages[0]["content"]


def test_templates_come_from_the_settings(tmp_path, database_url, sessions, owner):
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url, tribunal={
        "critique_template": "JUDGE {count}: {question} | {answers}",
        "answer_template": "<{model}> {text}",
    })
    job, candidates = new_tribunal(sessions, settings, owner, candidates=["tiny", "tiny"], judge="tiny")
    run_step(sessions, settings, candidates[0].id, "one")
    [critique] = run_step(sessions, settings, candidates[1].id, "two")
    assert critique.prompt == "JUDGE 2: What is a list? | <tiny> one\n\n<tiny> two"


def test_a_failing_step_fails_the_tribunal_naming_the_step(sessions, settings, owner):
    """The error names the step; the other candidate is cancelled and nothing more is scheduled."""
    job, candidates = new_tribunal(sessions, settings, owner)
    assert run_step(sessions, settings, candidates[1].id, fail="the prompt is too long") == []
    failed = reload(sessions, job.id)
    assert (failed.status, failed.error_code) == ("failed", "engine_rejected")
    assert failed.error_message == "candidate 2 of 2 (model tiny-b) failed: the prompt is too long"
    assert reload(sessions, candidates[0].id).status == "cancelled"
    assert [s.step for s in steps_of(sessions, job.id)] == ["candidate", "candidate"]


def test_a_failing_judge_is_named(sessions, settings, owner):
    job, candidates = new_tribunal(sessions, settings, owner)
    run_step(sessions, settings, candidates[0].id)
    [critique] = run_step(sessions, settings, candidates[1].id)
    run_step(sessions, settings, critique.id, fail="out of memory")
    assert reload(sessions, job.id).error_message == "the critique (judge, model tiny-b) failed: out of memory"


def test_cancel_stops_the_steps_and_schedules_nothing(sessions, settings, owner):
    """Cancelling cancels the unfinished steps; a step that was already running cannot complete."""
    job, candidates = new_tribunal(sessions, settings, owner)
    run_step(sessions, settings, candidates[0].id)
    with transaction(sessions) as session:
        assert claim_job(session, candidates[1].id, "w2") is not None
        jobs.cancel_job(session, owner, job.id)
    assert [s.status for s in steps_of(sessions, job.id)] == ["succeeded", "cancelled"]
    with transaction(sessions) as session:
        late = succeed(session, settings, candidates[1].id, "w2", text="late")
    assert late == ([], [], [], []), "the late result is dropped and schedules nothing"
    assert reload(sessions, job.id).status == "cancelled"
    assert len(steps_of(sessions, job.id)) == 2


def test_a_step_lost_too_often_fails_its_tribunal(sessions, settings, owner):
    """A step whose workers keep dying is requeued, then failed as worker_lost, and fails its tribunal."""
    job, [first, _] = new_tribunal(sessions, settings, owner)
    for worker in ("a", "b", "c"):
        with transaction(sessions) as session:
            assert claim_job(session, first.id, worker) is not None
        expire_lease(sessions, first.id)
        with transaction(sessions) as session:
            recovered = recovery.recover_abandoned(session, settings, utcnow())
        assert recovered == ((0, 1) if worker == "c" else (1, 0))
    failed = reload(sessions, job.id)
    assert failed.status == "failed" and failed.error_code == "worker_lost"
    assert failed.error_message.startswith("candidate 1 of 2 (model tiny) failed: the worker running this job was lost")


@pytest.mark.parametrize("mode, backlog, bypassed", [
    ("never", 10_000, False), ("always", 0, True), ("auto", 501, True), ("auto", 500, False)])
def test_bypass_decision(mode, backlog, bypassed):
    readings = {"backlog": backlog, "queues": {}}
    decision = tribunal.decide(mode, readings if mode == "auto" else None, 500)
    assert decision.bypassed is bypassed
    if mode == "auto":
        assert decision.readings == {"backlog": backlog, "queues": {}, "threshold": 500}
    if bypassed:
        assert ("501" in decision.reason and "bypass_backlog" in decision.reason) or "always" in decision.reason
    else:
        assert decision.reason is None


def test_a_bypassed_tribunal_is_a_single_pass_on_the_first_candidate_model(sessions, settings, owner):
    decision = tribunal.Decision(True, "busy", {"backlog": 900, "threshold": 500, "queues": {}})
    job, [step] = new_tribunal(sessions, settings, owner, decision, candidates=["tiny-b", "tiny"], bypass="auto")
    assert (step.step, step.model, step.prompt) == ("single_pass", "tiny-b", "What is a list?")
    assert run_step(sessions, settings, step.id, "A sequence.") == []
    done = jobs.job_to_dict(reload(sessions, job.id))
    assert done["status"] == "succeeded" and done["result"]["text"] == "A sequence."
    trace = done["tribunal"]
    assert (trace["bypassed"], trace["reason"], trace["readings"]["backlog"]) == (True, "busy", 900)
    assert [c["model"] for c in trace["candidates"]] == ["tiny-b"]
    assert (trace["candidates"][0]["text"], trace["critique"], trace["final"]) == ("A sequence.", None, "A sequence.")


def test_steps_are_not_jobs_of_the_api(sessions, settings, owner):
    job, candidates = new_tribunal(sessions, settings, owner)
    with sessions() as session:
        with pytest.raises(NoSuchJobError):
            jobs.get_job(session, owner, candidates[0].id)
        assert [j.id for j in jobs.list_jobs(session, owner)[0]] == [job.id]


@pytest.mark.parametrize("fields, named", [
    ({"candidates": ["tiny", "nope"]}, "candidates.1"),
    ({"judge": "nope"}, "judge"),
    ({"reviser": "nope"}, "reviser"),
    ({"params": {"max_tokens": 300}}, "params.max_tokens"),
    ({"candidates": ["tiny"] * 9}, "candidates"),
])
def test_bad_tribunal_requests_are_named(sessions, settings, owner, fields, named):
    with pytest.raises(InvalidRequestError, match=named):
        new_tribunal(sessions, settings, owner, **fields)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_candidates_ending_together_schedule_one_critique(sessions, settings, owner, monkeypatch):
    """Two workers end the last two candidates in overlapping transactions
    (each has stored its answer before either records its step's end): the
    tribunal's row lock lets exactly one of them see both answers."""
    job, candidates = new_tribunal(sessions, settings, owner)
    for step in candidates:
        with transaction(sessions) as session:
            assert claim_job(session, step.id, worker=step.id) is not None
    both_completed = threading.Barrier(2)
    step_ended = tribunal.step_ended

    def step_ended_once_both_completed(session, step_id, templates):
        both_completed.wait(timeout=10)
        return step_ended(session, step_id, templates)

    monkeypatch.setattr(tribunal, "step_ended", step_ended_once_both_completed)
    scheduled = []

    def end(step):
        with transaction(sessions) as session:
            finished = succeed(session, settings, step.id, worker=step.id)
        assert finished.ended == [step.id]
        scheduled.extend(next_id for next_id, _ in finished.next_jobs)

    threads = [threading.Thread(target=end, args=(step,)) for step in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [reload(sessions, step_id).step for step_id in scheduled] == ["critique"]
    assert [s.step for s in steps_of(sessions, job.id)].count("critique") == 1
