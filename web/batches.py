"""``/api/v1/batches``: upload a file of prompts, follow it, read its results, cancel it."""

from flask import Blueprint, Response, current_app, g, request, url_for

from queue_engine import batches, results
from queue_engine.errors import InvalidRequestError
from queue_engine.inputs import read_json, text_problem
from queue_engine.schemas import BatchCreate

from . import queueing
from .auth import require_api_key
from .db import get_session
from .jobs import query_int, query_text
from .queueing import preview_batch, submit_batch
from .waiting import read_after_wait

bp = Blueprint("batches", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)


#: How form fields and query parameters write true and false.
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def batch_form():
    """The form fields as a validated :class:`BatchCreate` (``params`` and
    ``params_columns`` are JSON text, ``keep_columns`` true or false)."""
    fields = dict(request.form)
    if "params" in fields:
        fields["params"] = read_json(fields["params"], "params") if fields["params"].strip() else {}
    if "params_columns" in fields:
        text = fields["params_columns"]
        fields["params_columns"] = read_json(text, "params_columns") if text.strip() else None
    if "keep_columns" in fields:
        # A word that is neither stays text, and BatchCreate refuses it naming the field.
        fields["keep_columns"] = BOOLEAN_WORDS.get(fields["keep_columns"].strip().lower(), fields["keep_columns"])
    return BatchCreate.model_validate(fields)


def query_flag(name):
    """The query parameter ``name`` as a boolean (absent: false)."""
    raw = query_text(name)
    if raw is None:
        return False
    if raw.strip().lower() not in BOOLEAN_WORDS:
        raise InvalidRequestError(f"{name}: {raw!r} is not true or false", param=name)
    return BOOLEAN_WORDS[raw.strip().lower()]


def uploaded_file():
    """The multipart ``file`` part, or a 400 that says what to send."""
    if request.mimetype != "multipart/form-data":
        raise InvalidRequestError(
            f"send the upload as multipart/form-data with the file in the field 'file' "
            f"(this request's Content-Type is {request.mimetype or 'missing'!r})", "invalid_content_type")
    file = request.files.get("file")
    if file is None:
        # Werkzeug drops the whole form when a part's name or file name is not UTF-8.
        unread = "" if request.form else " (no field could be read: are the field names and the file name UTF-8?)"
        raise InvalidRequestError(f"file: attach the CSV or JSONL file as the multipart field 'file'{unread}",
                                  "missing_file", "file")
    problem = file.filename and text_problem(file.filename)
    if problem:
        raise InvalidRequestError(f"file: the file name {problem}", param="file")
    return file


@bp.post("/batches")
def create_batch():
    # Uploads may be far larger than JSON bodies; the file part is spooled to disk.
    request.max_content_length = current_app.extensions["qe_settings"].batches.max_bytes
    file = uploaded_file()
    if query_flag("dry_run"):
        return preview_batch(batch_form(), file), 200
    batch = submit_batch(batch_form(), file)
    return batches.batch_to_dict(batch), 202, {"Location": url_for(".get_batch", batch_id=batch.id)}


@bp.get("/batches")
def list_batches():
    page, next_cursor = batches.list_batches(
        get_session(), g.api_key.id, limit=query_int("limit", 20), cursor=query_text("cursor"),
    )
    return {"data": [batches.batch_to_dict(batch) for batch in page], "next_cursor": next_cursor}


@bp.get("/batches/<batch_id>")
def get_batch(batch_id):
    """The batch; with ``?wait=S``, once it ends or after S seconds."""
    return batches.batch_to_dict(
        read_after_wait("batch", lambda session: batches.get_batch(session, g.api_key.id, batch_id,
                                                                   g.api_key.is_operator)))


@bp.get("/batches/<batch_id>/results")
def batch_results(batch_id):
    """One row per input row, in input order, streamed; partial while the batch runs."""
    file_format = results_format()
    batch = batches.get_batch(get_session(), g.api_key.id, batch_id, g.api_key.is_operator)
    return results_response(batch, file_format)


def results_format():
    """The query's ``format`` (default csv), or a 400 unless it is one of :data:`queue_engine.results.FORMATS`."""
    file_format = request.args.get("format", "csv")
    if file_format not in results.FORMATS:
        raise InvalidRequestError(f"format: {file_format!r} is not one of {', '.join(results.FORMATS)}")
    return file_format


def results_response(batch, file_format):
    """The streamed results of ``batch`` (also the dashboard's download)."""
    return Response(
        stream_results(current_app.extensions["qe_sessions"], batch.id, results.Layout(batch), file_format),
        content_type=results.FORMATS[file_format],
        headers={"Content-Disposition": f'attachment; filename="{batch.id}-results.{file_format}"'},
    )


#: How each format's pieces are written (``queue_engine.results``).
WRITERS = {"csv": results.csv_pieces, "jsonl": results.jsonl_pieces, "xlsx": results.xlsx_pieces}


def stream_results(sessions, batch_id, layout, file_format):
    """The results in pieces, read through a session of their own: the
    request's session is closed before a streamed answer is sent."""
    with sessions() as session:
        yield from WRITERS[file_format](results.result_rows(session, batch_id), layout)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    return batches.batch_to_dict(queueing.cancel_batch(batch_id))
