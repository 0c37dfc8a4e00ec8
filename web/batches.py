"""``/api/v1/batches``: upload a file of prompts, follow it, read its results, cancel it."""

import json

from flask import Blueprint, Response, current_app, g, request, url_for

from queue_engine import batches, results
from queue_engine.errors import InvalidRequestError
from queue_engine.schemas import BatchCreate

from .auth import require_api_key
from .db import get_session
from .jobs import query_int
from .queueing import submit_batch

bp = Blueprint("batches", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)


def batch_form():
    """The form fields as a validated :class:`BatchCreate` (``params`` is JSON text)."""
    fields = dict(request.form)
    if "params" in fields:
        try:
            fields["params"] = json.loads(fields["params"]) if fields["params"].strip() else {}
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"params: not valid JSON ({e.msg}); send an object such as "
                                      '{"max_tokens": 64}') from None
    return BatchCreate.model_validate(fields)


@bp.post("/batches")
def create_batch():
    # Uploads may be far larger than JSON bodies; the file part is spooled to disk.
    request.max_content_length = current_app.extensions["qe_settings"].batches.max_bytes
    file = request.files.get("file")
    if file is None:
        raise InvalidRequestError("file: attach the CSV or JSONL file as the multipart field 'file'", "missing_file")
    batch = submit_batch(batch_form(), file)
    return batches.batch_to_dict(batch), 202, {"Location": url_for(".get_batch", batch_id=batch.id)}


@bp.get("/batches")
def list_batches():
    page, next_cursor = batches.list_batches(
        get_session(), g.api_key.id, limit=query_int("limit", 20), cursor=request.args.get("cursor"),
    )
    return {"data": [batches.batch_to_dict(batch) for batch in page], "next_cursor": next_cursor}


@bp.get("/batches/<batch_id>")
def get_batch(batch_id):
    return batches.batch_to_dict(batches.get_batch(get_session(), g.api_key.id, batch_id))


@bp.get("/batches/<batch_id>/results")
def batch_results(batch_id):
    """One row per input row, in input order, streamed; partial while the batch runs."""
    file_format = request.args.get("format", "csv")
    if file_format not in results.FORMATS:
        raise InvalidRequestError(f"format: {file_format!r} is not one of {', '.join(results.FORMATS)}")
    batch = batches.get_batch(get_session(), g.api_key.id, batch_id)
    return Response(
        stream_results(current_app.extensions["qe_sessions"], batch, file_format),
        content_type=results.FORMATS[file_format],
        headers={"Content-Disposition": f'attachment; filename="{batch.id}-results.{file_format}"'},
    )


def stream_results(sessions, batch, file_format):
    """The results in pieces, read through a session of their own: the
    request's session is closed before a streamed answer is sent."""
    with sessions() as session:
        rows = batches.result_rows(session, batch.id)
        if file_format == "csv":
            yield from results.csv_pieces(rows, batch.id_column)
        else:
            yield from results.jsonl_pieces(rows)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    session = get_session()
    batch = batches.cancel_batch(session, g.api_key.id, batch_id)
    session.commit()
    return batches.batch_to_dict(batch)
