"""Files of the OpenAI-compatible API (``/v1/files``): storing, reading,
listing and deleting them, with OpenAI's file object as their shape.

The bytes live on disk under ``Settings.files_dir`` (one file per id); the
database holds what the file object shows. An upload is copied in chunks to
a temporary file beside its final place and renamed once complete, so its
size costs no memory and a half-written file is never visible.
"""

import os
import secrets
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from .errors import InvalidRequestError, NotFoundError
from .inputs import text_problem
from .models import File

#: The purposes accepted; OpenAI has more, for features this service lacks.
PURPOSES = ("batch",)
#: OpenAI's largest page of ``GET /v1/files``, and its default.
MAX_LIST_LIMIT = 10_000
ORDERS = ("asc", "desc")
CHUNK_BYTES = 1 << 20


class NoSuchFileError(NotFoundError):
    """No file with this id is visible to this key."""


class FileTooLargeError(InvalidRequestError):
    """An upload over ``files.max_bytes``; nothing of it is kept."""

    code = "file_too_large"


def new_file_id():
    """``file-`` and an id that sorts by creation time (milliseconds), then at random."""
    return f"file-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def content_path(settings, file_id):
    return Path(settings.files_dir) / file_id


def check_purpose(purpose):
    """Raises InvalidRequestError unless ``purpose`` is one this service accepts."""
    if purpose not in PURPOSES:
        raise InvalidRequestError(
            f"purpose: {purpose!r} is not supported; use one of {', '.join(PURPOSES)}",
            "invalid_purpose" if purpose else "missing_purpose", "purpose")


def store_file(session, settings, owner_id, stream, filename, purpose):
    """Copy ``stream`` (binary) to disk and record it as a file of ``owner_id``.

    The content is renamed into place before the row is committed (by the
    caller), so a committed row always has its content.

    Raises:
        InvalidRequestError: the purpose or the file name is not accepted.
        FileTooLargeError: the content is over ``files.max_bytes``.
    """
    check_purpose(purpose)
    filename = filename or "upload"
    problem = text_problem(filename)
    if problem or len(filename) > 255:
        raise InvalidRequestError(f"file: the file name {problem or 'is longer than 255 characters'}", param="file")
    file_id = new_file_id()
    size = write_content(stream, content_path(settings, file_id), settings.files.max_bytes)
    file = File(id=file_id, owner_id=owner_id, purpose=purpose, filename=filename, bytes=size)
    session.add(file)
    session.flush()
    return file


def write_content(stream, path, max_bytes):
    """Copy ``stream`` to ``path`` chunk by chunk; returns the size.

    Raises:
        FileTooLargeError: more than ``max_bytes``; the partial copy is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := stream.read(CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise FileTooLargeError(
                        f"file: the file is larger than this server accepts ({max_bytes} bytes, files.max_bytes)",
                        param="file")
                out.write(chunk)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return size


def get_file(session, owner_id, file_id):
    """The file ``file_id`` if ``owner_id`` uploaded it.

    Raises:
        NoSuchFileError: no such file, or another key's (never tell which).
    """
    file = session.get(File, file_id) if isinstance(file_id, str) else None
    if file is None or file.owner_id != owner_id:
        raise NoSuchFileError(f"no file {file_id!r}")
    return file


def open_content(settings, file):
    """The file's content, opened for reading in binary.

    Raises:
        NoSuchFileError: the row exists but its content is gone from disk.
    """
    try:
        return open(content_path(settings, file.id), "rb")
    except FileNotFoundError:
        raise NoSuchFileError(f"the content of file {file.id!r} is missing from the server's disk") from None


def list_files(session, owner_id, limit=MAX_LIST_LIMIT, after=None, order="desc", purpose=None):
    """A page of the owner's files as OpenAI pages them: ``(files, has_more)``.

    ``after`` is the last id of the previous page, in the same ``order``.
    """
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit: must be between 1 and {MAX_LIST_LIMIT}, got {limit}", param="limit")
    if order not in ORDERS:
        raise InvalidRequestError(f"order: {order!r} is not one of {', '.join(ORDERS)}", param="order")
    query = select(File).where(File.owner_id == owner_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        query = query.where(File.id < after if order == "desc" else File.id > after)
    query = query.order_by(File.id.desc() if order == "desc" else File.id.asc()).limit(limit + 1)
    items = list(session.scalars(query))
    return items[:limit], len(items) > limit


def delete_file(session, owner_id, file_id):
    """Delete the file's row (the caller commits, then calls :func:`remove_content`).

    Raises:
        NoSuchFileError: as :func:`get_file`.
    """
    file = get_file(session, owner_id, file_id)
    session.delete(file)
    session.flush()
    return file


def remove_content(settings, file_id):
    content_path(settings, file_id).unlink(missing_ok=True)


def file_to_dict(file, size=None):
    """OpenAI's file object; ``size`` where ``file.bytes`` is not yet known
    (a batch's output or error file)."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes if size is None else size,
        "created_at": int(file.created_at.timestamp()),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def file_list_to_dict(page, has_more, size=lambda file: file.bytes):
    """OpenAI's list object for a page of files."""
    return {
        "object": "list",
        "data": [file_to_dict(file, size(file)) for file in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": has_more,
    }
