"""Reading a CSV batch file: a header row, then one request per record; a
prompt from a column or from a template over the columns, a system message,
per-row parameters from columns, and every cell kept when asked
(``queue_engine.uploads`` says which problems refuse the file and which fail a row)."""

import csv
import itertools
import re

from pydantic import ValidationError

from .errors import InvalidFileError, InvalidJsonError
from .inputs import read_json, text_problem
from .params import Params
from .uploads import Row, RowReader

CSV_DELIMITERS = (",", ";", "\t", "|")
#: How a ``params_columns`` cell becomes a parameter's value, by parameter.
INTEGER_PARAMS = {"max_tokens", "seed", "n", "top_logprobs"}
NUMBER_PARAMS = {"temperature", "top_p", "presence_penalty", "frequency_penalty"}
INTEGER = re.compile(r"[+-]?[0-9]+")


class CsvReader(RowReader):
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
        cells, checked with the batch's as :class:`~queue_engine.params.Params`
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
