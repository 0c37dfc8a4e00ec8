"""Writing a batch's results as CSV, JSONL or xlsx, a few rows at a time.

One record per input row, in input order (with ``n`` > 1, one per sample, or
the samples side by side: :class:`Layout`). The input's own columns come
first when the batch kept them (``keep_columns``); a structured answer
(``response_format`` json_schema, choice, regex) adds a column per top-level
property of the schema, or an ``answer`` column.

CSV cells that a spreadsheet would run as a formula are escaped (OWASP's
advice: prefix a single quote), and every cell holding a line break is
quoted, so a spreadsheet reads exactly one record per row. xlsx cells are
typed strings, never formulas, so they hold the text as it is.
"""

import csv
import io
import json
import os
import tempfile
from types import SimpleNamespace

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from sqlalchemy import select

from . import structured
from .models import Job

FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/jsonl",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
CSV_COLUMNS = ("status", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
#: A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Rows written per piece of the streamed answer.
ROWS_PER_PIECE = 500
#: Bytes per piece of a streamed xlsx file.
XLSX_PIECE_BYTES = 1 << 16
#: The most characters an Excel cell holds; longer text is cut there in xlsx (CSV and JSONL keep it whole).
XLSX_CELL_CHARS = 32767
#: The prefix of an input column whose name is also a result column's.
INPUT_PREFIX = "input_"


def escape_cell(value):
    """``value`` as a CSV cell that no spreadsheet runs as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def error_text(row):
    return f"{row.error_code}: {row.error_message}" if row.error_code else ""


def result_rows(session, batch_id):
    """Every row's outcome in input order, with its output and cells, streamed from the database."""
    query = (
        select(Job.custom_id, Job.status, Job.result_text, Job.finish_reason, Job.prompt_tokens,
               Job.completion_tokens, Job.error_code, Job.error_message, Job.output, Job.cells)
        .where(Job.batch_id == batch_id)
        .order_by(Job.row_index)
        .execution_options(yield_per=1000)
    )
    return session.execute(query)


class Layout:
    """The columns of a batch's results, from its params and options.

    * ``structured``: the top-level properties of a json_schema's object
      schema, or ``["answer"]`` for choice, regex and a schema without
      properties; empty for unchecked formats.
    * ``n`` > 1 (or ``n`` from a column): by default one record per sample
      with a ``sample`` column (0-based); with ``options["samples"] ==
      "columns"``, the batch's ``n`` samples side by side (``text_0``,
      ``text_1``, ..., each structured column suffixed ``_0``, ``_1``, ...).
      The row's tokens are on its first sample's record.
    * ``Batch.columns`` (keep_columns): the input's columns first, renamed
      ``input_<name>`` where they clash with a result column. The id column,
      when it is an input column, appears once, in its input place.
    """

    def __init__(self, batch):
        params = batch.params or {}
        options = getattr(batch, "options", None) or {}
        self.response_format = params.get("response_format")
        self.structured = (structured.property_names(self.response_format)
                           or (["answer"] if structured.is_checked(self.response_format) else []))
        self.n = params.get("n", 1)
        varying_n = "n" in (options.get("params_columns") or {})
        self.by_columns = options.get("samples") == "columns"
        self.sampled = not self.by_columns and (self.n > 1 or varying_n)
        self.id_header = batch.id_column or "id"
        self.inputs = list(getattr(batch, "columns", None) or [])
        if self.by_columns:
            per_sample = [f"{name}_{i}" for i in range(self.n) for name in ("text", *self.structured)]
            results = ["status", *per_sample, *CSV_COLUMNS[2:]]
        else:
            results = [*(["sample"] if self.sampled else []), "status", "text", *self.structured, *CSV_COLUMNS[2:]]
        self.with_id = self.id_header not in self.inputs
        self.result_header = [*([self.id_header] if self.with_id else []), *results]
        taken = set(self.result_header)
        self.input_header = []
        for name in self.inputs:
            if name == self.id_header:
                self.input_header.append(name)
                continue
            renamed = name
            while renamed in taken:
                renamed = INPUT_PREFIX + renamed
            taken.add(renamed)
            self.input_header.append(renamed)
        self.header = [*self.input_header, *self.result_header]

    @classmethod
    def plain(cls, id_header="id"):
        """The layout of a batch without structured answers, samples or kept columns."""
        return cls(SimpleNamespace(params={}, id_column=id_header))

    def records(self, rows):
        """Each output line's cells (str, int or None), in :attr:`header`'s order."""
        for row in rows:
            cells = getattr(row, "cells", None) or {}
            leading = [cells.get(name, row.custom_id if name == self.id_header else None) for name in self.inputs]
            if self.with_id:
                leading.append(row.custom_id)
            samples = samples_of(row)
            if self.by_columns:
                per_sample = []
                for i in range(self.n):
                    text, _, parsed, _ = samples[i] if i < len(samples) else (None, None, None, None)
                    per_sample += [text, *self.structured_cells(parsed)]
                yield [*leading, row.status, *per_sample, row.finish_reason, row.prompt_tokens,
                       row.completion_tokens, error_text(row)]
            elif not self.sampled:
                text, _, parsed, _ = samples[0] if samples else (row.result_text, None, None, None)
                yield [*leading, row.status, text, *self.structured_cells(parsed), row.finish_reason,
                       row.prompt_tokens, row.completion_tokens, error_text(row)]
            elif not samples:
                yield [*leading, None, row.status, row.result_text, *self.structured_cells(None),
                       row.finish_reason, row.prompt_tokens, row.completion_tokens, error_text(row)]
            else:
                for i, (text, finish_reason, parsed, answer_error) in enumerate(samples):
                    error = f"{structured.INVALID_ANSWER}: {answer_error}" if answer_error else (
                        "" if has_sample_errors(row) else error_text(row))
                    yield [*leading, i, row.status, text, *self.structured_cells(parsed), finish_reason,
                           row.prompt_tokens if i == 0 else None, row.completion_tokens if i == 0 else None, error]

    def structured_cells(self, parsed):
        """The structured columns' values of one parsed answer."""
        if not self.structured:
            return []
        if self.structured == ["answer"] and not structured.property_names(self.response_format):
            return [cell_of(parsed)]
        values = parsed if isinstance(parsed, dict) else {}
        return [cell_of(values.get(name)) for name in self.structured]

    def json_items(self, rows):
        """Each row's JSONL object: its input cells, then OpenAI's field names where they exist."""
        checked = structured.is_checked(self.response_format)
        for row in rows:
            cells = getattr(row, "cells", None) or {}
            item = {name: cells.get(source) for name, source in zip(self.input_header, self.inputs)}
            item.update({
                "custom_id": row.custom_id,
                "status": row.status,
                "text": row.result_text,
                "finish_reason": row.finish_reason,
                "usage": (
                    {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}
                    if row.prompt_tokens is not None else None
                ),
                "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
            })
            output = getattr(row, "output", None) or {}
            if checked:
                item["parsed"] = output.get("parsed")
            if output.get("choices"):
                item["samples"] = [
                    {"text": text, "finish_reason": finish_reason, **({"parsed": parsed} if checked else {}),
                     **({"error": error} if error else {})}
                    for text, finish_reason, parsed, error in samples_of(row)]
            yield item


def samples_of(row):
    """``(text, finish_reason, parsed, answer error)`` of each sample of a row that has a text; [] otherwise."""
    output = getattr(row, "output", None) or {}
    choices = output.get("choices")
    if not choices:
        if row.result_text is None:
            return []
        return [(row.result_text, row.finish_reason, output.get("parsed"), None)]
    parsed = output.get("parsed")
    parsed = parsed if isinstance(parsed, list) else [None] * len(choices)
    errors = output.get("answer_errors") or [None] * len(choices)
    return [(choice["text"], choice.get("finish_reason"), value, error)
            for choice, value, error in zip(choices, parsed, errors)]


def has_sample_errors(row):
    return bool((getattr(row, "output", None) or {}).get("answer_errors"))


def cell_of(value):
    """A parsed value as a cell: strings and numbers as they are, anything else as compact JSON."""
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def csv_pieces(rows, layout):
    """Yield the CSV results in pieces of text: a header, then one line per record.
    ``layout``: a :class:`Layout`, or the id column's name for :meth:`Layout.plain`."""
    layout = Layout.plain(layout) if isinstance(layout, str) else layout
    buffer = io.StringIO()
    # The csv module quotes a cell only for the characters of its line
    # terminator: with "\n" alone, a lone "\r" went out unquoted and split
    # the row in spreadsheets. RFC 4180's "\r\n" quotes both.
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([escape_cell(name) for name in layout.header])
    for count, record in enumerate(layout.records(rows), start=1):
        writer.writerow(["" if value is None else escape_cell(value) for value in record])
        if count % ROWS_PER_PIECE == 0:
            yield _drain(buffer)
    yield _drain(buffer)


def jsonl_pieces(rows, layout=None):
    """Yield the JSONL results in pieces: one object per row."""
    layout = layout or Layout.plain()
    lines = []
    for item in layout.json_items(rows):
        lines.append(json.dumps(item, ensure_ascii=False))
        if len(lines) == ROWS_PER_PIECE:
            yield "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def xlsx_pieces(rows, layout):
    """Yield the xlsx results in pieces of bytes: the same cells as the CSV (unescaped).

    openpyxl's write-only mode writes each row to a temporary file as it comes,
    so memory stays flat whatever the batch's size; the workbook is zipped at
    the end, and the file is streamed from disk and then deleted. The first
    byte goes out only once every row is written.
    """
    handle, path = tempfile.mkstemp(suffix=".xlsx")
    os.close(handle)
    try:
        workbook = Workbook(write_only=True)
        sheet = workbook.create_sheet("results")
        sheet.append([_xlsx_cell(sheet, name) for name in layout.header])
        for record in layout.records(rows):
            sheet.append([_xlsx_cell(sheet, value) for value in record])
        workbook.save(path)
        with open(path, "rb") as file:
            while piece := file.read(XLSX_PIECE_BYTES):
                yield piece
    finally:
        os.unlink(path)


def _xlsx_cell(sheet, value):
    if not isinstance(value, str):
        return value
    # Typed as a string after the value is set: openpyxl reads a str starting with "=" as a formula.
    cell = WriteOnlyCell(sheet, value=ILLEGAL_CHARACTERS_RE.sub("\ufffd", value)[:XLSX_CELL_CHARS])
    cell.data_type = "s"
    return cell


def _drain(buffer):
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
