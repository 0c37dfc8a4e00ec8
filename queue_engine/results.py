"""Writing a batch's results as CSV or JSONL, a few rows at a time.

One record per input row, in input order. CSV cells that a spreadsheet would
run as a formula are escaped (OWASP's advice: prefix a single quote), and
every cell holding a line break is quoted, so a spreadsheet reads exactly one
record per row.
"""

import csv
import io
import json

FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl"}
CSV_COLUMNS = ("status", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
#: A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Rows written per piece of the streamed answer.
ROWS_PER_PIECE = 500


def escape_cell(value):
    """``value`` as a CSV cell that no spreadsheet runs as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def error_text(row):
    return f"{row.error_code}: {row.error_message}" if row.error_code else ""


def csv_pieces(rows, id_header):
    """Yield the CSV results in pieces of text: a header, then one line per row."""
    buffer = io.StringIO()
    # The csv module quotes a cell only for the characters of its line
    # terminator: with "\n" alone, a lone "\r" went out unquoted and split
    # the row in spreadsheets. RFC 4180's "\r\n" quotes both.
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([escape_cell(id_header), *CSV_COLUMNS])
    for count, row in enumerate(rows, start=1):
        writer.writerow([
            escape_cell(row.custom_id), row.status, escape_cell(row.result_text or ""), row.finish_reason or "",
            _number(row.prompt_tokens), _number(row.completion_tokens), escape_cell(error_text(row)),
        ])
        if count % ROWS_PER_PIECE == 0:
            yield _drain(buffer)
    yield _drain(buffer)


def jsonl_pieces(rows):
    """Yield the JSONL results in pieces: one object per row, OpenAI's field names
    where they exist (``custom_id``, ``usage``, ``error``)."""
    lines = []
    for row in rows:
        item = {
            "custom_id": row.custom_id,
            "status": row.status,
            "text": row.result_text,
            "finish_reason": row.finish_reason,
            "usage": (
                {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}
                if row.prompt_tokens is not None else None
            ),
            "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
        }
        lines.append(json.dumps(item, ensure_ascii=False))
        if len(lines) == ROWS_PER_PIECE:
            yield "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def _number(value):
    return "" if value is None else value


def _drain(buffer):
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
