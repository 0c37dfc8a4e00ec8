"""The OpenAI-compatible ``/v1`` part of the OpenAPI document: OpenAI's shapes,
written out (they are OpenAI's, not ours to derive from our models)."""

from queue_engine import completions, files

from .openapi import _errors, _json, _ref


def v1_list(item):
    """OpenAI's list object of pages (``after``/``limit``)."""
    return {
        "type": "object",
        "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": _ref(item)},
            "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
    }


#: OpenAI's shapes under ``/v1``, written out: they are OpenAI's, not ours to derive.
V1_SCHEMAS = {
    "V1File": {
        "type": "object",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
        "properties": {
            "id": {"type": "string", "pattern": "^file-"}, "object": {"const": "file"},
            "bytes": {"type": "integer", "minimum": 0},
            "created_at": {"type": "integer", "description": "unix seconds"},
            "filename": {"type": "string"}, "purpose": {"type": "string", "enum": [*files.PURPOSES, "batch_output"],
                        "description": "batch_output: a /v1 batch's output or error file"},
            "status": {"type": "string", "enum": ["processed"]},
            "expires_at": {"type": ["integer", "null"]}, "status_details": {"type": ["string", "null"]},
        },
    },
    "V1FileList": v1_list("V1File"),
    "V1FileDeleted": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"const": True}},
    },
    "V1Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string", "description": "a configured model profile"},
                       "object": {"const": "model"}, "created": {"type": "integer", "description": "unix seconds"},
                       "owned_by": {"type": "string"}},
    },
    "V1ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("V1Model")}},
    },
    "V1Batch": {
        "type": "object",
        "required": ["id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                     "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
                     "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
                     "request_counts", "metadata", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "batch"},
            "endpoint": {"type": "string", "enum": list(completions.ENDPOINTS)},
            "errors": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["object", "data"],
                "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                    "type": "object", "required": ["code", "message", "param", "line"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "param": {"type": ["string", "null"]},
                                   "line": {"type": ["integer", "null"]}}}}}}]},
            "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
            "status": {"type": "string", "enum": ["validating", "failed", "in_progress", "finalizing", "completed",
                                                  "expired", "cancelling", "cancelled"]},
            "output_file_id": {"type": ["string", "null"]}, "error_file_id": {"type": ["string", "null"]},
            **{name: {"type": ["integer", "null"], "description": "unix seconds"} for name in (
                "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": {"type": "object", "required": ["total", "completed", "failed"],
                               "properties": {"total": {"type": "integer"}, "completed": {"type": "integer"},
                                              "failed": {"type": "integer"}}},
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
            "model": {"type": ["string", "null"]},
            "usage": {"type": "object",
                      "required": ["input_tokens", "output_tokens", "total_tokens", "input_tokens_details",
                                   "output_tokens_details"],
                      "properties": {"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
                                     "total_tokens": {"type": "integer"},
                                     "input_tokens_details": {"type": "object"},
                                     "output_tokens_details": {"type": "object"}}},
        },
    },
    "V1BatchList": v1_list("V1Batch"),
    **{name: {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string", "description": f"{prefix}-<the job's id>"}, "object": {"const": obj},
            "created": {"type": "integer", "description": "unix seconds"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", answer, "finish_reason"]}},
            "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]},
        },
    } for name, prefix, obj, answer in (("V1ChatCompletion", "chatcmpl", "chat.completion", "message"),
                                        ("V1TextCompletion", "cmpl", "text_completion", "text"))},
    "V1Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
        }},
    },
}
FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
V1_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}


def v1_batch_paths():
    """OpenAI's Batch API over the native batches."""
    return {
        "/v1/batches": {
            "post": {
                "summary": "Create a batch from an uploaded file (OpenAI's Batch API); a problem with the file "
                           "answers 200 with a failed batch whose errors name the line",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
                    "properties": {"input_file_id": {"type": "string"},
                                   "endpoint": {"type": "string", "enum": list(completions.ENDPOINTS)},
                                   "completion_window": {"type": "string", "description": "batches.completion_windows"},
                                   "metadata": {"type": "object", "maxProperties": 16,
                                                "additionalProperties": {"type": "string", "maxLength": 512}}}}}}},
                "responses": {"200": _json("V1Batch", "the batch"), **v1_errors(400, 401, 404)},
            },
            "get": {
                "summary": "List your /v1 batches, newest first (after, limit)",
                "parameters": [{"name": "after", "in": "query", "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                          "maximum": 100}}],
                "responses": {"200": _json("V1BatchList", "a page of batches"), **v1_errors(400, 401)},
            },
        },
        "/v1/batches/{batch_id}": {"get": {
            "summary": "Read a batch", "parameters": [V1_BATCH_ID],
            "responses": {"200": _json("V1Batch", "the batch"), **v1_errors(401, 404)}}},
        "/v1/batches/{batch_id}/cancel": {"post": {
            "summary": "Cancel a batch: queued rows at once, running rows when they end", "parameters": [V1_BATCH_ID],
            "responses": {"200": _json("V1Batch", "the batch, cancelling or cancelled"),
                          **v1_errors(401, 404, 409)}}},
    }


def v1_errors(*statuses):
    """As :func:`_errors`, in OpenAI's error shape."""
    return {status: {**answer, "content": {"application/json": {"schema": _ref("V1Error")}}}
            for status, answer in _errors(*statuses).items()}


def v1_file_paths():
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload a file (OpenAI's Files API; purpose batch)",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"},
                                   "purpose": {"type": "string", "enum": list(files.PURPOSES)}}}}}},
                "responses": {"200": _json("V1File", "the file, stored"), **v1_errors(400, 401, 413)},
            },
            "get": {
                "summary": "List your files (OpenAI's paging: after, limit, order)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string"},
                     "description": "the last id of the previous page"},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": files.MAX_LIST_LIMIT}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": list(files.ORDERS)}},
                    {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json("V1FileList", "a page of files"), **v1_errors(400, 401)},
            },
        },
        "/v1/files/{file_id}": {
            "get": {"summary": "Read a file object", "parameters": [FILE_ID],
                    "responses": {"200": _json("V1File", "the file"), **v1_errors(401, 404)}},
            "delete": {"summary": "Delete a file and its content", "parameters": [FILE_ID],
                       "responses": {"200": _json("V1FileDeleted", "the file is gone"), **v1_errors(401, 404)}},
        },
        "/v1/files/{file_id}/content": {
            "get": {"summary": "The file's bytes as uploaded, streamed", "parameters": [FILE_ID],
                    "responses": {"200": {"description": "the content",
                                          "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
                                  **v1_errors(401, 404)}},
        },
    }


def v1_model_paths():
    return {
        "/v1/models": {"get": {"summary": "The configured model profiles (OpenAI's Models API)",
                               "responses": {"200": _json("V1ModelList", "every configured model profile"),
                                             **v1_errors(401)}}},
        "/v1/models/{model_id}": {"get": {
            "summary": "One model profile (OpenAI's Models API)",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json("V1Model", "the model profile"), **v1_errors(401, 404)}}},
    }


def completion_request(kind):
    """The body of a chat (``messages``) or text (``prompt``) completion request."""
    text = ({"messages": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                               "content": {"type": ["string", "array"]}}}}}
            if kind == "chat" else {"prompt": {"type": ["string", "array"], "description": "one prompt"}})
    return {"type": "object", "required": ["model", next(iter(text))], "properties": {
        "model": {"type": "string"}, **text,
        "stream": {"type": "boolean", "description": "server-sent events in OpenAI's chunk format, "
                                                     "ending with data: [DONE]"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
        "temperature": {"type": "number"}, "top_p": {"type": "number"}, "seed": {"type": "integer"},
        "n": {"type": "integer"}, "stop": {"type": ["string", "array"]},
        "presence_penalty": {"type": "number"}, "frequency_penalty": {"type": "number"},
        "logprobs": {"type": ["boolean", "integer"]}, "top_logprobs": {"type": "integer"},
        "response_format": {"type": "object"}, "metadata": {"type": "object"},
    }}


def completion_path(kind, summary, schema):
    return {"post": {
        "summary": summary,
        "description": "A job on the interactive lane (visible at /api/v1/jobs). It waits for a worker to start it "
                       "up to openai.queue_timeout_seconds, then answers 503 with Retry-After. A client that goes "
                       "away cancels its job. Unsupported OpenAI parameters (tools, logit_bias, ...) are a 400 "
                       "naming them.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": completion_request(kind)}}},
        "responses": {
            "200": {"description": "the answer; with stream: true, server-sent events",
                    "content": {"application/json": {"schema": _ref(schema)},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **v1_errors(400, 401, 409),
            "500": {"description": "the job failed (its error code and message)",
                    "content": {"application/json": {"schema": _ref("V1Error")}}},
            "503": {"description": "no worker started the request in time (no_worker_available; Retry-After), or "
                                   "the database cannot be reached",
                    "content": {"application/json": {"schema": _ref("V1Error")}}},
        },
    }}


def v1_paths():
    return {
        **v1_file_paths(),
        **v1_batch_paths(),
        **v1_model_paths(),
        "/v1/chat/completions": completion_path("chat", "A chat completion, through the queue", "V1ChatCompletion"),
        "/v1/completions": completion_path("text", "A text completion, through the queue", "V1TextCompletion"),
    }
