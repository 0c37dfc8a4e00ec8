"""``/v1/files``: OpenAI's Files API, so the official ``openai`` client can
upload batch input files unchanged."""

from flask import Blueprint, Response, current_app, g, request, send_file

from queue_engine import files, openai_batches
from queue_engine.models import File

from .auth import require_api_key
from .batches import uploaded_file
from .db import get_session
from .jobs import query_int, query_text

bp = Blueprint("v1_files", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

#: Room for the multipart framing and the other fields around the file, so a
#: file of exactly ``files.max_bytes`` is accepted; the file's own size is
#: checked while it is copied.
FORM_OVERHEAD_BYTES = 64 * 1024


def settings():
    return current_app.extensions["qe_settings"]


@bp.post("/files")
def create_file():
    request.max_content_length = settings().files.max_bytes + FORM_OVERHEAD_BYTES
    upload = uploaded_file()
    session = get_session()
    file = files.store_file(session, settings(), g.api_key.id, upload.stream, upload.filename,
                            request.form.get("purpose"))
    session.commit()
    return files.file_to_dict(file)


@bp.get("/files")
def list_files():
    page, has_more = files.list_files(
        get_session(), g.api_key.id, limit=query_int("limit", files.MAX_LIST_LIMIT), after=query_text("after"),
        order=request.args.get("order", "desc"), purpose=query_text("purpose"))
    body = files.file_list_to_dict(page, has_more, lambda file: openai_batches.file_bytes(get_session(), file))
    get_session().commit()  # generated files' sizes, counted once their batch ended
    return body


@bp.get("/files/<file_id>")
def get_file(file_id):
    session = get_session()
    file = files.get_file(session, g.api_key.id, file_id)
    body = files.file_to_dict(file, openai_batches.file_bytes(session, file))
    session.commit()  # a generated file's size, counted once its batch ended
    return body


@bp.get("/files/<file_id>/content")
def file_content(file_id):
    """The bytes as uploaded, streamed from disk; a batch's output or error
    file, streamed from its rows."""
    file = files.get_file(get_session(), g.api_key.id, file_id)
    if file.content != "disk":
        return Response(stream_generated(current_app.extensions["qe_sessions"], file.id),
                        content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{file.filename}"'})
    return send_file(files.open_content(settings(), file), mimetype="application/octet-stream",
                     as_attachment=True, download_name=file.filename)


@bp.delete("/files/<file_id>")
def delete_file(file_id):
    session = get_session()
    file = files.delete_file(session, g.api_key.id, file_id)
    session.commit()
    files.remove_content(settings(), file.id)
    return {"id": file.id, "object": "file", "deleted": True}


def stream_generated(sessions, file_id):
    """A generated file's lines, read through a session of their own: the
    request's session is closed before a streamed answer is sent."""
    with sessions() as session:
        yield from openai_batches.file_content(session, session.get(File, file_id))
