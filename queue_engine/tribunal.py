"""The tribunal: candidate answers, a judge's critique, a reviser's final answer.

A tribunal is a job of kind ``tribunal`` whose work is done by step jobs
(kind ``tribunal_step``, ``parent_id`` set). Each step is an ordinary job on
its own model's interactive queue, so it is claimed, leased, retried and
cancelled like any other. The steps are chained through the database: the
worker that finishes a step calls :func:`step_ended` in the same transaction,
which records the step in the tribunal's trace and creates the steps that
follow, for the worker to send once it commits. No thread ever waits for
another queue.

::

    candidates (in parallel) --all answered--> critique (judge) --> revision (reviser)

Under load (``bypass: auto`` and a backlog over ``tribunal.bypass_backlog``,
read when the tribunal is submitted) it runs one step instead, a single pass
on the first candidate's model, and its trace says so and why.
"""

import copy
import secrets
from typing import NamedTuple

from sqlalchemy import select, update

from . import prompts
from .errors import InvalidRequestError
from .jobs import JobState, add_once, announce_end, cancel_steps, check_model, job_from_request, new_id, transition
from .models import Job, utcnow

CANDIDATE, CRITIQUE, REVISION, SINGLE_PASS = "candidate", "critique", "revision", "single_pass"

#: Each step in words, as an error message names it.
STEP_NAMES = {
    CANDIDATE: "candidate {number} of {count} (model {model})",
    CRITIQUE: "the critique (judge, model {model})",
    REVISION: "the revision (reviser, model {model})",
    SINGLE_PASS: "the single pass (model {model})",
}


class Decision(NamedTuple):
    """Whether a tribunal runs in full, and what that was decided on."""

    bypassed: bool
    reason: str | None = None
    readings: dict | None = None


def models_of(request):
    """Every model profile a tribunal request would use, each once, in order."""
    return list(dict.fromkeys([*request.candidates, request.judge, request.reviser or request.judge]))


def check_request(settings, request):
    """The checks that need the settings: every model exists and takes the params.

    Raises:
        InvalidRequestError: naming the field that is wrong.
    """
    most = settings.tribunal.max_candidates
    if len(request.candidates) > most:
        raise InvalidRequestError(
            f"candidates: {len(request.candidates)} given; at most {most} (tribunal.max_candidates)")
    for number, model in enumerate(request.candidates):
        check_model(settings, model, request.params, f"candidates.{number}")
    check_model(settings, request.judge, request.params, "judge")
    if request.reviser is not None:
        check_model(settings, request.reviser, request.params, "reviser")


def decide(mode, readings, threshold):
    """Run in full or as a single pass?

    Args:
        mode: the request's ``bypass``: ``auto``, ``never`` or ``always``.
        readings: for ``auto``, :func:`queue_engine.load.read_backlog` of the
            tribunal's models.
        threshold: ``tribunal.bypass_backlog``.
    """
    if mode == "never":
        return Decision(False)
    if mode == "always":
        return Decision(True, "the request asked for a single pass (bypass: always)")
    readings = {**readings, "threshold": threshold}
    backlog = readings["backlog"]
    if backlog > threshold:
        reason = (f"the queues of its models hold a backlog of {backlog} requests, over the "
                  f"bypass threshold of {threshold} (tribunal.bypass_backlog)")
        return Decision(True, reason, readings)
    return Decision(False, None, readings)


def create_tribunal(session, owner_id, request, settings, decision, idempotency_key=None):
    """Store a tribunal and its first steps, all queued (the steps marked sent).

    Returns:
        ``(tribunal, steps, created)``: the job, the steps to send now, and
        whether this call created them (False: an ``Idempotency-Key`` replay,
        and no steps).
    """
    check_request(settings, request)
    base_seed = request.params.seed if request.params.seed is not None else secrets.randbelow(2**31)
    candidates = request.candidates[:1] if decision.bypassed else request.candidates
    job = job_from_request(
        owner_id, request, idempotency_key, kind="tribunal", model=request.candidates[0], lane="interactive",
        tribunal={
            "bypass": request.bypass,
            "bypassed": decision.bypassed,
            "reason": decision.reason,
            "readings": decision.readings,
            "candidates": [{"model": model, "seed": base_seed + n, "text": None} for n, model in enumerate(candidates)],
            "judge": request.judge,
            "reviser": request.reviser or request.judge,
            "critique": None,
            "final": None,
        },
    )
    job, created = add_once(session, job)
    if not created:
        return job, [], False
    if decision.bypassed:
        steps = [_step(job, SINGLE_PASS, job.model, job.prompt, job.messages, base_seed, index=0)]
    else:
        steps = [_step(job, CANDIDATE, c["model"], job.prompt, job.messages, c["seed"], index=n)
                 for n, c in enumerate(job.tribunal["candidates"])]
    session.add_all(steps)
    session.flush()
    return job, steps, True


def _step(tribunal, step, model, prompt, messages, seed, index=None):
    """A queued step of ``tribunal``: one generation on ``model``, marked
    sent (the caller sends it after commit, or releases it)."""
    return Job(
        id=new_id("step"),
        owner_id=tribunal.owner_id,
        kind="tribunal_step",
        parent_id=tribunal.id,
        step=step,
        row_index=index,
        model=model,
        lane="interactive",
        status=JobState.QUEUED.value,
        prompt=prompt,
        messages=messages,
        params={**tribunal.params, "seed": seed},
        attempts=0,
        created_at=utcnow(),
        dispatched_at=utcnow(),
    )


def _text_step(tribunal, step, model, text, seed):
    """A step whose input is ``text`` we wrote: a prompt, or one user message
    when the tribunal was asked in messages (so a chat model gets its template)."""
    if tribunal.messages is not None:
        return _step(tribunal, step, model, None, [{"role": "user", "content": text}], seed)
    return _step(tribunal, step, model, text, None, seed)


def step_ended(session, step_id, templates):
    """Record a step that just ended and schedule what follows.

    Call it in the transaction that ended the step. The tribunal's row is
    locked first, so when candidates end at once on several workers, exactly
    one of them sees every answer in and creates the critique.

    Args:
        templates: the ``tribunal`` settings (prompt templates).

    Returns:
        The new steps, stored and queued, for the caller to send after commit
        (none when ``step_id`` is not a tribunal's step).
    """
    step = session.get(Job, step_id, populate_existing=True)
    if step is None or step.parent_id is None:
        return []
    tribunal = session.scalar(
        select(Job).where(Job.id == step.parent_id).with_for_update().execution_options(populate_existing=True)
    )
    if tribunal is None or tribunal.status != JobState.RUNNING.value:
        return []  # cancelled, or already failed by another step
    if step.status == JobState.FAILED.value:
        _fail(session, tribunal, step)
        return []
    if step.status != JobState.SUCCEEDED.value:
        return []
    trace = copy.deepcopy(tribunal.tribunal)
    usage = {
        "prompt_tokens": (tribunal.prompt_tokens or 0) + (step.prompt_tokens or 0),
        "completion_tokens": (tribunal.completion_tokens or 0) + (step.completion_tokens or 0),
    }
    new_steps = []
    if step.step == CANDIDATE:
        trace["candidates"][step.row_index]["text"] = step.result_text
        if all(c["text"] is not None for c in trace["candidates"]):
            new_steps.append(_critique_step(tribunal, trace, templates))
    elif step.step == CRITIQUE:
        trace["critique"] = step.result_text
        new_steps.append(_revision_step(tribunal, trace, templates))
    else:  # REVISION or SINGLE_PASS: the final answer
        if step.step == SINGLE_PASS:
            trace["candidates"][0]["text"] = step.result_text
        trace["final"] = step.result_text
        if transition(session, tribunal.id, JobState.RUNNING, JobState.SUCCEEDED, tribunal=trace,
                      result_text=step.result_text, finish_reason=step.finish_reason, **usage):
            announce_end(session, tribunal.id)
        return []
    session.execute(
        update(Job).where(Job.id == tribunal.id).values(tribunal=trace, **usage)
        .execution_options(synchronize_session=False)
    )
    session.add_all(new_steps)
    session.flush()
    return new_steps


def _critique_step(tribunal, trace, templates):
    question = prompts.question_text(tribunal.prompt, tribunal.messages)
    text = prompts.critique_prompt(templates, question, trace["candidates"])
    return _text_step(tribunal, CRITIQUE, trace["judge"], text, trace["candidates"][0]["seed"])


def _revision_step(tribunal, trace, templates):
    question = prompts.question_text(tribunal.prompt, tribunal.messages)
    text = prompts.revision_prompt(templates, question, trace["candidates"], trace["critique"])
    return _text_step(tribunal, REVISION, trace["reviser"], text, trace["candidates"][0]["seed"])


def _fail(session, tribunal, step):
    """Fail the tribunal because ``step`` failed, and stop its other steps."""
    if transition(session, tribunal.id, JobState.RUNNING, JobState.FAILED, error_code=step.error_code,
                  error_message=f"{describe_step(step, len(tribunal.tribunal['candidates']))} failed: {step.error_message}"):
        cancel_steps(session, tribunal.id)
        announce_end(session, tribunal.id)


def describe_step(step, candidates):
    """The step in words, e.g. ``candidate 2 of 3 (model tiny)``."""
    number = step.row_index + 1 if step.row_index is not None else None
    return STEP_NAMES[step.step].format(number=number, count=candidates, model=step.model)
