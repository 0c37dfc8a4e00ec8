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
ids seen so far grows with it (to refuse duplicates).
"""

import codecs
import csv
import itertools
import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from .errors import InvalidFileError, InvalidJsonError, InvalidRequestError
from .inputs import format_location, read_json, text_problem
from .schemas import MESSAGE_ROLES, Params
from .templates import Template

CSV_DELIMITERS = (",", ";", "\t", "|")
MAX_ID_CHARS = 255
#: JSONL request bodies may name these besides the sampling parameters.
BODY_INPUT_KEYS = {"model", "messages", "prompt"}
#: OpenAI's newer name for ``max_tokens``.
BODY_ALIASES = {"max_completion_tokens": "max_tokens"}
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
#: Form fields that only a CSV file can use (they name or read its columns).
CSV_ONLY_FIELDS = ("template", "system", "params_columns", "empty_cells", "keep_columns")
#: How a ``params_columns`` cell becomes a parameter's value, by parameter.
INTEGER_PARAMS = {"max_tokens", "seed", "n", "top_logprobs"}
NUMBER_PARAMS = {"temperature", "top_p", "presence_penalty", "frequency_penalty"}
INTEGER = re.compile(r"[+-]?[0-9]+")


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


class _Reader:
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


class CsvReader(_Reader):
    """CSV with a header row: UTF-8 with or without BOM, the delimiter given or sniffed."""

    def __init__(self, lines, upload):
        super().__init__(lines, upload)
        self.id_header = upload.id_column
        #: The header's column names, once read.
        self.header = None
        self._reader = None

    def _rows(self):
        upload = self.upload
        header_line = next(self.lines, "")
        if not header_line.strip():
            raise InvalidFileError("the file is empty; a CSV batch needs a header row naming the columns", 1)
        named = upload.template.columns[0] if upload.template else upload.prompt_column
        delimiter = upload.delimiter or sniff_delimiter(header_line, named)
        # A field longer than this is a quote left open, not a prompt.
        csv.field_size_limit(max(upload.max_prompt_chars * 4, 1 << 20))
        self._reader = reader = csv.reader(itertools.chain([header_line], self.lines), delimiter=delimiter, strict=True)
        self.header = header = [name.strip() for name in self._checked(self._next_record(), None)]
        self._check_columns(header)
        prompt_at = None if upload.template else self._column(header, upload.prompt_column, "prompt_column")
        if upload.id_column in header:
            id_at = header.index(upload.id_column)
        elif upload.id_column_given:
            self._column(header, upload.id_column, "id_column")
        else:
            id_at = None
            self.id_header = "row"
        for record in iter(self._next_record, None):
            line = reader.line_num
            self._checked(record, header)
            if not any(record):
                continue
            if len(record) != len(header):
                raise InvalidFileError(
                    f"{len(record)} fields where the header has {len(header)}; "
                    "check the quoting and the delimiter", line)
            index = self._next_index(line)
            if id_at is None:
                custom_id = str(index + 1)
            else:
                custom_id = record[id_at]
                self._check_id(custom_id, line, upload.id_column)
            yield self._row(index, line, custom_id, record, header, prompt_at)
        if self._count == 0:
            raise InvalidFileError("the file has a header but no rows", reader.line_num)

    def _check_columns(self, header):
        """Refuse a template, ``params_columns`` or ``keep_columns`` that the header cannot serve."""
        upload = self.upload
        columns = ", ".join(repr(h) for h in header)
        missing = upload.template.missing_columns(header) if upload.template else []
        if missing:
            raise _field_error(f"the template names {', '.join(map(repr, missing))}, which the header lacks "
                               f"(the columns are: {columns})", "template")
        for name, column in upload.params_columns.items():
            if column not in header:
                raise _field_error(f"params_columns maps {name} to {column!r}, which the header lacks "
                                   f"(the columns are: {columns})", "params_columns")
        if upload.keep_columns or upload.template or upload.params_columns:
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise InvalidFileError(f"the header names {', '.join(map(repr, repeated))} more than once; "
                                       "with a template, params_columns or keep_columns, column names must be unique",
                                       1)

    def _row(self, index, line, custom_id, record, header, prompt_at):
        """The :class:`Row` of one record: its prompt (or messages), its
        parameters from ``params_columns``, its cells; or why it cannot run."""
        upload = self.upload
        cells = dict(zip(header, record)) if upload.template or upload.params_columns or upload.keep_columns else None
        error = None
        if upload.template:
            blank = [column for column in upload.template.columns if not cells[column].strip()]
            if blank and upload.empty_cells == "fail":
                error = ("empty_cell", f"the cell of column {blank[0]!r} is empty and the template uses it "
                                       "(empty_cells=empty fills it in empty)")
            prompt = upload.template.fill({**cells, **{column: "" for column in blank}})
        else:
            prompt = record[prompt_at]
        params, params_error = self._cell_params(cells) if upload.params_columns else ({}, None)
        error = error or params_error or self._prompt_error(prompt)
        row = Row(index, line, custom_id, params=params, cells=cells if upload.keep_columns else None)
        if upload.system is None:
            row.prompt = prompt
        else:
            row.messages = [{"role": "system", "content": upload.system}, {"role": "user", "content": prompt}]
            error = error or self._prompt_error(row.text)
        row.error = error
        return row

    def _cell_params(self, cells):
        """``(params, error)``: the row's parameters from its ``params_columns``
        cells, checked with the batch's as :class:`~queue_engine.schemas.Params`
        checks them; an empty cell keeps the batch's value."""
        overrides, column_of = {}, {}
        for name, column in self.upload.params_columns.items():
            cell = cells[column].strip()
            if not cell:
                continue
            try:
                overrides[name] = cell_value(name, cell)
            except ValueError as e:
                return {}, ("invalid_param", f"column {column!r} ({name}): {e}")
            column_of[name] = column
        if not overrides:
            return {}, None
        try:
            params = Params.model_validate({**self.upload.batch_params, **overrides})
        except ValidationError as e:
            problem = e.errors()[0]
            name = str(problem["loc"][0]) if problem["loc"] else next(iter(overrides))
            where = f"column {column_of[name]!r} ({name})" if name in column_of else "params_columns"
            return {}, ("invalid_param", f"{where}: {problem['msg']}")
        if params.max_tokens > self.upload.max_tokens_limit and "max_tokens" in overrides:
            return {}, ("invalid_param",
                        f"column {column_of['max_tokens']!r} (max_tokens): {params.max_tokens} is above model "
                        f"{self.upload.model!r}'s limit of {self.upload.max_tokens_limit}")
        dumped = params.model_dump(mode="json")
        return {name: dumped[name] for name in overrides if name in dumped}, None

    def _next_record(self):
        starts_on = self._reader.line_num + 1
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise InvalidFileError(f"cannot read the CSV record that starts on this line ({e}); check the quoting",
                                   starts_on) from None

    def _checked(self, record, header):
        """``record`` once every cell holds storable text (``text_problem``);
        cells are named by the ``header``, or numbered in the header itself."""
        for number, cell in enumerate(record):
            problem = text_problem(cell)
            if problem:
                column = header[number] if header and number < len(header) else number + 1
                raise InvalidFileError(problem, self._reader.line_num, column)
        return record

    @staticmethod
    def _column(header, name, field):
        if name not in header:
            columns = ", ".join(repr(h) for h in header)
            raise InvalidFileError(f"no column {name!r} (set {field} to one of: {columns})", 1)
        return header.index(name)


def _field_error(message, param):
    """An :class:`InvalidFileError` of the header (line 1) blamed on the form field ``param``."""
    error = InvalidFileError(message, 1)
    error.param = param
    return error


def cell_value(name, cell):
    """The value of parameter ``name`` that the (stripped, non-empty) CSV ``cell`` holds.

    Raises:
        ValueError: the cell is not of the parameter's type, saying what it should be.

    >>> cell_value("seed", "42"), cell_value("temperature", "0.5"), cell_value("stop", "END")
    (42, 0.5, 'END')
    """
    if name in INTEGER_PARAMS:
        if not INTEGER.fullmatch(cell):
            raise ValueError(f"{cell!r} is not a whole number")
        return int(cell)
    if name in NUMBER_PARAMS:
        try:
            return float(cell)
        except ValueError:
            raise ValueError(f"{cell!r} is not a number") from None
    if name == "logprobs":
        if cell.lower() in ("true", "false"):
            return cell.lower() == "true"
        if not INTEGER.fullmatch(cell):
            raise ValueError(f"{cell!r} is not true, false or a whole number")
        return int(cell)
    if name == "response_format":
        try:
            return read_json(cell, name)
        except InvalidJsonError as e:
            raise ValueError(f"not JSON: {e.problem}") from None
    return cell


def sniff_delimiter(header_line, prompt_column):
    """The delimiter that makes the header contain ``prompt_column``; else the
    one that splits it most; else a comma."""
    best, best_count = ",", 1
    for delimiter in CSV_DELIMITERS:
        names = [name.strip() for name in next(csv.reader([header_line], delimiter=delimiter), [])]
        if prompt_column in names:
            return delimiter
        if len(names) > best_count:
            best, best_count = delimiter, len(names)
    return best


class JsonlReader(_Reader):
    """The OpenAI batch line format: ``{custom_id, method, url, body}``, where
    ``body`` has ``messages`` or ``prompt`` and may set sampling parameters."""

    id_header = "custom_id"
    header = None

    def _rows(self):
        line = 0
        for line, raw in enumerate(self.lines, start=1):
            if raw.strip():
                yield self._row(raw, line)
        if self._count == 0:
            raise InvalidFileError("the file has no requests; JSONL batches have one JSON object per line", max(line, 1))

    def _row(self, raw, line):
        try:
            item = read_json(raw)
        except InvalidJsonError as e:
            raise InvalidFileError(e.problem, line, e.param) from None
        if not isinstance(item, dict):
            raise InvalidFileError("each line must be a JSON object with custom_id and body", line)
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str):
            raise InvalidFileError("custom_id is missing or not a string", line, "custom_id")
        self._check_id(custom_id, line, "custom_id")
        url = item.get("url")
        if url is not None and url not in OPENAI_URLS:
            raise InvalidFileError(f"url {url!r} is not supported; use one of {', '.join(OPENAI_URLS)}", line, "url")
        body = item.get("body")
        if not isinstance(body, dict):
            raise InvalidFileError("body is missing or not an object", line, "body")
        model = body.get("model")
        if model is not None and model != self.upload.model:
            raise InvalidFileError(
                f"body.model {model!r} differs from the batch's model {self.upload.model!r}; a batch runs one model",
                line, "body.model")
        index = self._next_index(line)
        row = Row(index, line, custom_id, params=self._params(body, line))
        if "messages" in body:
            row.messages = self._messages(body["messages"], line)
            row.error = self._messages_error(row)
        elif isinstance(body.get("prompt"), str):
            row.prompt = body["prompt"]
            row.error = self._prompt_error(row.prompt)
        else:
            raise InvalidFileError("body needs messages (a list) or prompt (a string)", line, "body")
        return row

    def _params(self, body, line):
        overrides = {}
        for key, value in body.items():
            if key in BODY_INPUT_KEYS:
                continue
            name = BODY_ALIASES.get(key, key)
            if name not in Params.model_fields:
                raise InvalidFileError(f"body.{key} is not a supported parameter", line, f"body.{key}")
            overrides[name] = value
        if not overrides:
            return {}
        try:
            params = Params.model_validate({**self.upload.batch_params, **overrides})
        except ValidationError as e:
            problem = e.errors()[0]
            raise InvalidFileError(problem["msg"], line, f"body.{format_location(problem['loc'])}") from None
        if params.max_tokens > self.upload.max_tokens_limit:
            raise InvalidFileError(
                f"max_tokens {params.max_tokens} is above model {self.upload.model!r}'s limit of "
                f"{self.upload.max_tokens_limit}", line, "body.max_tokens")
        return {name: getattr(params, name) for name in overrides}

    def _messages_error(self, row):
        for number, message in enumerate(row.messages):
            if not message["content"] or message["content"].isspace():
                return self._prompt_error("", f"body.messages.{number}.content")
        return self._prompt_error(row.text)

    @staticmethod
    def _messages(messages, line):
        if not isinstance(messages, list) or not messages:
            raise InvalidFileError("body.messages must be a non-empty list", line, "body.messages")
        return [chat_message(message, line, f"body.messages.{number}") for number, message in enumerate(messages)]


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
