"""OpenAI's Batch API (``/v1/batches``) on top of the native batches.

A ``/v1`` batch IS a native batch (same row, same jobs, same bulk lane,
counts, cancel and webhooks); this module turns an uploaded ``/v1`` file into
one, shows a batch as OpenAI's batch object, writes its output and error
files from its rows, and expires batches past their ``expires_at``.

Decisions:

- A file problem (not JSONL, a line that is not a request, a ``url`` other
  than the batch's ``endpoint``, an unknown model) stores a batch with no
  rows whose status is ``failed`` and whose ``errors`` name the line.
- A native ``failed`` batch with rows (no row succeeded) is ``completed`` to
  OpenAI, its rows in the error file, as OpenAI reports it.
- Output and error files are :class:`File` rows made with the batch
  (``content`` ``output``/``error``); their ids appear in the batch object
  once they have lines to show. Cancelled rows go to the error file with
  code ``batch_cancelled``, expired ones with ``batch_expired``.
- Token totals are summed from the rows onto the batch row in the
  transaction that ends the batch (``batches.settle``), so ``usage`` is one
  primary-key read, and zero while the batch runs.
"""

import json
import re
from datetime import timedelta

from sqlalchemy import select

from . import dispatch, uploads
from .batches import ACTIVE, BatchState, add_counts, announce_end, batch_transition, create_batch
from .completions import ENDPOINTS, response_body
from .errors import InvalidFileError, InvalidRequestError
from .files import NoSuchFileError, get_file, new_file_id, open_content
from .jobs import JobState, new_id, transition_statement
from .models import Batch, File, Job, utcnow
from .schemas import BatchCreate

MAX_METADATA_PAIRS, MAX_KEY_CHARS, MAX_VALUE_CHARS = 16, 64, 512
MAX_LIST_LIMIT = 100
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ENDED_ROWS = (JobState.FAILED.value, JobState.CANCELLED.value)


def window_seconds(window):
    """``2s``, ``1h``, ``24h``, ``7d`` as seconds."""
    match = re.fullmatch(r"(\d+)([smhd])", window or "")
    if not match:
        raise ValueError(f"not a duration: {window!r}")
    return int(match.group(1)) * UNITS[match.group(2)]


def check_request(settings, body):
    """The ``POST /v1/batches`` body's fields, checked; 400 naming the param."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if not isinstance(body.get("input_file_id"), str):
        raise InvalidRequestError("input_file_id: required, a file id", param="input_file_id")
    if body.get("endpoint") not in ENDPOINTS:
        raise InvalidRequestError(f"endpoint: must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    windows = settings.batches.completion_windows
    if body.get("completion_window") not in windows:
        raise InvalidRequestError(f"completion_window: must be one of {', '.join(windows)}",
                                  param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
            raise InvalidRequestError(f"metadata: an object of at most {MAX_METADATA_PAIRS} pairs", param="metadata")
        for key, value in metadata.items():
            if len(key) > MAX_KEY_CHARS or not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
                raise InvalidRequestError(
                    f"metadata: keys of at most {MAX_KEY_CHARS} characters, string values of at most "
                    f"{MAX_VALUE_CHARS} (key {key[:80]!r})", param="metadata")


def scan_file(settings, file, endpoint):
    """The model of the file's requests, after checking each line's ``url``
    and ``body.model``; one streamed pass over the file.

    Raises:
        InvalidFileError: naming the line.
    """
    model = None
    with open_content(settings, file) as stream:
        for line, raw in enumerate(uploads.decoded_lines(stream), start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError:
                raise InvalidFileError("the line is not JSON; a batch file has one request object per line",
                                       line) from None
            if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
                raise InvalidFileError("the line is not a request: {custom_id, method, url, body}", line)
            if item.get("url") != endpoint:
                raise InvalidFileError(f"url {item.get('url')!r} differs from the batch's endpoint {endpoint!r}",
                                       line, "url")
            line_model = item["body"].get("model")
            if not isinstance(line_model, str) or line_model not in settings.models:
                raise InvalidFileError(f"body.model {line_model!r} is not a model this server runs", line,
                                       "body.model")
            if model is not None and line_model != model:
                raise InvalidFileError(f"body.model {line_model!r} differs from the first line's {model!r}; "
                                       "a batch runs one model", line, "body.model")
            model = line_model
    if model is None:
        raise InvalidFileError("the file has no requests", 1)
    return model


def create(session, owner_id, settings, body, admit=None):
    """Store the ``/v1`` batch of ``body`` (checked by :func:`check_request`);
    once the caller commits, the dispatcher sends its chunks.

    Args:
        admit: ``admit(session, batch)`` is called with the batch and its rows
            in the session; what it raises (a quota) undoes the batch.

    Raises:
        NoSuchFileError: no such input file for this key.
    """
    file = get_file(session, owner_id, body["input_file_id"])
    if file.content != "disk":
        raise NoSuchFileError(f"no input file {file.id!r}")
    endpoint, window = body["endpoint"], body["completion_window"]
    extra = {"meta": body.get("metadata"), "endpoint": endpoint, "input_file_id": file.id,
             "completion_window": window}
    try:
        model = scan_file(settings, file, endpoint)
        request = BatchCreate(model=model)
        with session.begin_nested():
            with open_content(settings, file) as stream:
                reader = uploads.read_rows(stream, "jsonl", uploads.Upload.from_request(request, settings))
                batch = create_batch(session, owner_id, settings, request, reader, file_format="jsonl",
                                     filename=file.filename)
                if admit is not None:
                    admit(session, batch)  # inside the savepoint: on SQLite its release is a commit
    except InvalidFileError as e:
        return failed_batch(session, owner_id, file, e, extra)
    for key, value in extra.items():
        setattr(batch, key, value)
    batch.expires_at = batch.created_at + timedelta(seconds=window_seconds(window))
    for content in ("output", "error"):
        session.add(File(id=new_file_id() + content[0], owner_id=owner_id, purpose="batch_output",
                         filename=f"{batch.id}_{content}.jsonl", bytes=0, batch_id=batch.id, content=content))
    session.flush()
    return batch


def failed_batch(session, owner_id, file, error, extra):
    """A batch that failed at validation: no rows, ``errors`` naming the line."""
    now = utcnow()
    batch = Batch(id=new_id("batch"), owner_id=owner_id, model="", status=BatchState.FAILED.value,
                  input_format="jsonl", filename=file.filename, id_column="custom_id", params={},
                  total=0, completed=0, failed=0, cancelled=0, chunks=0, created_at=now, completed_at=now,
                  errors=[{"code": error.code, "message": str(error), "param": error.column or None,
                           "line": error.line}], **extra)
    session.add(batch)
    session.flush()
    return batch


def list_batches(session, owner_id, after=None, limit=20):
    """A page of the owner's ``/v1`` batches, newest first: ``(batches, has_more)``."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit: must be between 1 and {MAX_LIST_LIMIT}", param="limit")
    query = select(Batch).where(Batch.owner_id == owner_id, Batch.endpoint.is_not(None))
    if after is not None:
        query = query.where(Batch.id < after)
    items = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
    return items[:limit], len(items) > limit


def batch_files(session, batch_id):
    """``{"output": file, "error": file}`` of a ``/v1`` batch."""
    return {file.content: file for file in session.scalars(select(File).where(File.batch_id == batch_id))}


def stamp(moment):
    return int(moment.timestamp()) if moment is not None else None


def openai_status(batch):
    if batch.status == BatchState.FAILED.value and batch.errors is None:
        return "completed"
    return batch.status


def batch_to_dict(session, batch):
    """OpenAI's batch object."""
    status = openai_status(batch)
    ended_at = stamp(batch.completed_at)
    files = batch_files(session, batch.id)
    show_output = batch.completed > 0 and batch.status != BatchState.IN_PROGRESS.value
    show_error = (batch.failed + batch.cancelled) > 0
    prompt, completion = batch.prompt_tokens or 0, batch.completion_tokens or 0
    validated = batch.errors is None
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": None if validated else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": files["output"].id if show_output and "output" in files else None,
        "error_file_id": files["error"].id if show_error and "error" in files else None,
        "created_at": stamp(batch.created_at),
        "in_progress_at": stamp(batch.created_at) if validated else None,
        "expires_at": stamp(batch.expires_at),
        "finalizing_at": None,
        "completed_at": ended_at if status == "completed" else None,
        "failed_at": ended_at if status == "failed" else None,
        "expired_at": ended_at if status == "expired" else None,
        "cancelling_at": stamp(batch.cancelling_at or batch.cancelled_at),
        "cancelled_at": ended_at if status == "cancelled" else None,
        "request_counts": {"total": batch.total, "completed": batch.completed,
                           "failed": batch.failed + batch.cancelled},
        "metadata": batch.meta,
        "model": batch.model or None,
        "usage": {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


def batch_list_to_dict(session, page, has_more):
    return {"object": "list", "data": [batch_to_dict(session, batch) for batch in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": has_more}


# --- output and error files -----------------------------------------------------


def file_lines(session, batch, content):
    """The lines (text, newline included) of a batch's output or error file,
    streamed from its rows in input order."""
    wanted = [JobState.SUCCEEDED.value] if content == "output" else list(ENDED_ROWS)
    query = (
        select(Job.id, Job.custom_id, Job.status, Job.model, Job.created_at, Job.result_text, Job.finish_reason,
               Job.prompt_tokens, Job.completion_tokens, Job.output, Job.error_code, Job.error_message)
        .where(Job.batch_id == batch.id, Job.status.in_(wanted))
        .order_by(Job.row_index)
        .execution_options(yield_per=1000)
    )
    for row in session.execute(query):
        yield json.dumps(line_object(batch, row), ensure_ascii=False) + "\n"


def line_object(batch, row):
    """One line of an output or error file, as OpenAI writes it."""
    request_id = f"req_{row.id}"
    line = {"id": f"batch_req_{row.id}", "custom_id": row.custom_id}
    if row.status == JobState.SUCCEEDED.value:
        return {**line, "response": {"status_code": 200, "request_id": request_id,
                                     "body": response_body(batch.endpoint, row)}, "error": None}
    if row.status == JobState.CANCELLED.value:
        code = row.error_code if row.error_code == "batch_expired" else "batch_cancelled"
        message = "the batch expired before this request ran" if code == "batch_expired" else \
            "the batch was cancelled before this request ran"
        return {**line, "response": None, "error": {"code": code, "message": message}}
    error = {"code": row.error_code or "server_error", "message": row.error_message or ""}
    status_code = 500 if row.error_code in ("engine_error", "server_error") else 400
    body = {"error": {"message": error["message"], "type": "invalid_request_error" if status_code == 400
                      else "server_error", "param": None, "code": error["code"]}}
    return {**line, "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": error}


def file_content(session, file):
    """The content of a file: ``None`` for an uploaded one (on disk), else
    the batch and the generator of lines."""
    if file.content == "disk":
        return None
    batch = session.get(Batch, file.batch_id)
    return file_lines(session, batch, file.content)


def file_bytes(session, file):
    """The size of a generated file: counted once the batch has ended, and
    kept in the row; 0 while it runs."""
    if file.content == "disk" or file.bytes:
        return file.bytes
    batch = session.get(Batch, file.batch_id)
    if batch.status in ACTIVE:
        return 0
    file.bytes = sum(len(line.encode()) for line in file_lines(session, batch, file.content))
    return file.bytes


# --- ending: token totals, expiry ----------------------------------------------


def expire_batches(session, now=None):
    """Expire every in-progress batch past its ``expires_at``: its queued and
    running rows are cancelled with ``batch_expired`` (a worker finishing one
    later finds it no longer running, and its outcome is dropped), and the
    batch becomes ``expired``. Returns the ids expired; the caller commits.

    Rows are locked before the batch row, in the order workers lock them
    (``leases.finish`` ends rows, then counts them on the batch), so a sweep
    and a worker cannot deadlock. The batch's end is one conditional UPDATE:
    of several sweepers, and of workers settling the batch, exactly one
    writes it.
    """
    now = now or utcnow()
    due = session.scalars(select(Batch.id).where(
        Batch.status == BatchState.IN_PROGRESS.value, Batch.expires_at <= now)).all()
    expired = []
    for batch_id in due:
        cancelled = sum(session.execute(transition_statement(
            source, JobState.CANCELLED, [Job.batch_id == batch_id],
            {"error_code": "batch_expired", "error_message": "the batch expired", "finished_at": now})).rowcount
            for source in (JobState.QUEUED, JobState.RUNNING))
        ended = session.execute(batch_transition(
            [(BatchState.IN_PROGRESS, BatchState.EXPIRED)], [Batch.id == batch_id, Batch.expires_at <= now],
            cancelled=Batch.cancelled + cancelled, completed_at=now)).rowcount == 1
        if not ended:
            # Cancelled meanwhile: its rows count as cancelled, and may end it.
            if cancelled:
                add_counts(session, batch_id, cancelled=cancelled)
            continue
        dispatch.drop_chunks(session, batch_id)
        announce_end(session, batch_id)
        expired.append(batch_id)
    return expired
