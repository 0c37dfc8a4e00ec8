"""Reading an uploaded batch file (CSV or JSONL) one row at a time.

Problems come at two levels, as in OpenAI's batches:

- a problem with the *file* (not CSV/JSONL, not UTF-8, no header, no prompt
  column, broken quoting, a duplicate id, over a limit, a NUL character or
  an unpaired surrogate anywhere, a value of the wrong type) raises
  :class:`~queue_engine.errors.InvalidFileError` naming the line and column;
  the caller refuses the whole upload and keeps nothing;
- a problem with one *row* (an empty prompt or message, a prompt over the
  limit, an empty cell a template needs, a parameter cell that does not
  validate) comes back as that row's ``error``: the row fails and the others run.

A CSV batch may build its prompts from a template over the columns
(``queue_engine.templates``), add a system message (the rows are then chat
messages), take per-row parameters from columns (``params_columns``) and
keep every cell for the results (``keep_columns``).

The file is read as a stream, so its size costs no memory; only the set of
ids seen so far grows with it (to refuse duplicates). This module holds what
both formats share; ``csv_rows.py`` and ``jsonl_rows.py`` read each.
"""

import codecs
from dataclasses import dataclass, field

from .errors import InvalidFileError, InvalidRequestError
from .schemas import MESSAGE_ROLES
from .templates import Template

MAX_ID_CHARS = 255
#: Form fields that only a CSV file can use (they name or read its columns).
CSV_ONLY_FIELDS = ("template", "system", "params_columns", "empty_cells", "keep_columns")


@dataclass(slots=True)
class Row:
    """One request read from the file.

    ``params`` holds only what the row itself sets (JSONL ``body``); the
    batch's parameters apply to everything else. ``error`` is ``(code,
    message)`` when the row cannot run.
    """

    index: int
    line: int
    custom_id: str
    prompt: str | None = None
    messages: list | None = None
    params: dict | None = None
    error: tuple | None = None
    #: Every cell, column -> text (CSV with ``keep_columns``).
    cells: dict | None = None

    @property
    def text(self):
        """The prompt's text, for grouping rows that share a prefix."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(message["content"] for message in self.messages or ())


@dataclass(frozen=True)
class Upload:
    """How to read one uploaded file."""

    model: str
    max_rows: int
    max_prompt_chars: int
    max_tokens_limit: int
    batch_params: dict
    prompt_column: str = "prompt"
    id_column: str = "id"
    id_column_given: bool = False
    delimiter: str | None = None
    template: Template | None = None
    system: str | None = None
    params_columns: dict = field(default_factory=dict)
    empty_cells: str = "fail"
    keep_columns: bool = False
    #: The CSV-only form fields the request set (:data:`CSV_ONLY_FIELDS`).
    csv_fields: tuple = ()

    @classmethod
    def from_request(cls, request, settings):
        """How to read the file of a ``BatchCreate`` request under ``settings``.

        Raises:
            InvalidRequestError: fields that do not go together (``template``
                with ``prompt_column``, ``empty_cells`` without a template).
        """
        if request.template is not None and "prompt_column" in request.model_fields_set:
            raise InvalidRequestError(
                "template: give a template or a prompt_column, not both (a template names its columns itself)",
                param="template")
        if request.empty_cells is not None and request.template is None:
            raise InvalidRequestError("empty_cells: it says how a template fills empty cells; give a template",
                                      param="empty_cells")
        profile = settings.models.get(request.model)
        return cls(
            model=request.model,
            max_rows=settings.batches.max_rows,
            max_prompt_chars=settings.batches.max_prompt_chars,
            max_tokens_limit=profile.max_model_len if profile else 0,
            batch_params=request.params.model_dump(),
            prompt_column=request.prompt_column,
            id_column=request.id_column or "id",
            id_column_given=request.id_column is not None,
            delimiter=request.delimiter,
            template=Template.parse(request.template) if request.template is not None else None,
            system=request.system,
            params_columns=request.params_columns or {},
            empty_cells=request.empty_cells or "fail",
            keep_columns=bool(request.keep_columns),
            csv_fields=tuple(name for name in CSV_ONLY_FIELDS if getattr(request, name) not in (None, False)),
        )

    def check_format(self, file_format):
        """Refuse CSV-only fields for a JSONL file.

        Raises:
            InvalidRequestError: naming the first such field.
        """
        if file_format != "csv" and self.csv_fields:
            name = self.csv_fields[0]
            raise InvalidRequestError(
                f"{name}: only a CSV file has columns for it; a JSONL line sets its own messages and parameters "
                "in its body", param=name)

    @property
    def options(self):
        """What the batch stores as ``Batch.options``: the CSV-only fields given, or None."""
        options = {"template": self.template.text if self.template else None, "system": self.system,
                   "params_columns": self.params_columns or None,
                   "empty_cells": self.empty_cells if self.template else None, "keep_columns": self.keep_columns}
        return {name: value for name, value in options.items() if value not in (None, False)} or None


def detect_format(filename, head):
    """``"csv"`` or ``"jsonl"``, from the file name, else from the first bytes."""
    name = (filename or "").lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    if b"\x00" in head:
        raise InvalidFileError("this is a binary file; upload CSV or JSONL text", line=1)
    return "jsonl" if head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"{") else "csv"


def read_rows(stream, file_format, upload):
    """A reader that yields a :class:`Row` per request in the binary ``stream``.

    Its ``id_header`` names the id column, for the results file.

    Raises:
        InvalidFileError: while iterating, at the first problem with the file.
    """
    from .csv_rows import CsvReader  # they build on RowReader, below
    from .jsonl_rows import JsonlReader

    lines = decoded_lines(stream)
    return CsvReader(lines, upload) if file_format == "csv" else JsonlReader(lines, upload)


def decoded_lines(stream):
    """The text lines of a binary stream, line endings kept, BOM dropped.

    Decoding line by line (UTF-8 never has a newline byte inside a
    character) lets a decoding error name its exact line.
    """
    for number, raw in enumerate(stream, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidFileError(
                f"the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start + 1}); "
                "save it as UTF-8 and upload it again", number) from None


class RowReader:
    """What the CSV and JSONL readers share: row numbering, ids, the prompt's limits."""

    def __init__(self, lines, upload):
        self.lines = lines
        self.upload = upload
        self._seen_ids = set()
        self._count = 0

    def _next_index(self, line):
        if self._count >= self.upload.max_rows:
            raise InvalidFileError(f"more than {self.upload.max_rows} rows; split the file (limit: batches.max_rows)", line)
        self._count += 1
        return self._count - 1

    def _check_id(self, custom_id, line, column):
        if not custom_id.strip():
            raise InvalidFileError("the id is empty; every row needs a unique id", line, column)
        if len(custom_id) > MAX_ID_CHARS:
            raise InvalidFileError(f"the id is longer than {MAX_ID_CHARS} characters", line, column)
        if custom_id in self._seen_ids:
            raise InvalidFileError(f"duplicate id {custom_id!r}; ids must be unique within a file", line, column)
        self._seen_ids.add(custom_id)

    def _prompt_error(self, text, field="the prompt"):
        if not text or text.isspace():
            return ("empty_prompt", f"{field} is empty")
        if len(text) > self.upload.max_prompt_chars:
            return ("prompt_too_long",
                    f"the prompt has {len(text)} characters; the limit is {self.upload.max_prompt_chars}")
        return None

    def __iter__(self):
        return self._rows()


def chat_message(message, line, field):
    """A chat message as ``{role, content}``; OpenAI's text content parts are joined into one text.

    Raises:
        InvalidFileError: naming ``field`` (``body.messages.0``) or the part of it that is wrong.
    """
    if not isinstance(message, dict):
        raise InvalidFileError("each message must be an object with a role and content", line, field)
    if message.get("role") not in MESSAGE_ROLES:
        raise InvalidFileError(f"the role must be one of {', '.join(MESSAGE_ROLES)}", line, f"{field}.role")
    content = message.get("content")
    if isinstance(content, list):
        for number, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidFileError('only text parts are supported: {"type": "text", "text": "..."}',
                                       line, f"{field}.content.{number}")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise InvalidFileError("the content must be text, or a list of text parts", line, f"{field}.content")
    return {"role": message["role"], "content": content}
