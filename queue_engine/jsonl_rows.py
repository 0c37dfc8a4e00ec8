"""Reading a JSONL batch file in OpenAI's batch format: one request per line,
``{custom_id, method, url, body}``, the body's messages or prompt and
parameters (``queue_engine.uploads`` says which problems refuse the file and
which fail a row)."""

from pydantic import ValidationError

from .errors import InvalidFileError, InvalidJsonError
from .inputs import format_location, read_json
from .params import Params
from .uploads import Row, RowReader, chat_message

#: JSONL request bodies may name these besides the sampling parameters.
BODY_INPUT_KEYS = {"model", "messages", "prompt"}
#: OpenAI's newer name for ``max_tokens``.
BODY_ALIASES = {"max_completion_tokens": "max_tokens"}
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")


class JsonlReader(RowReader):
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
