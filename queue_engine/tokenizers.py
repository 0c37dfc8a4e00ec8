"""Counting a batch's prompt tokens before it runs (a dry run), with the
model's own tokenizer.

The tokenizer is loaded with ``transformers.AutoTokenizer`` from the model
profile's directory, once per directory in this process. The built-in
models (``tiny``) are looked for where workers build them
(``settings.models_dir``); the web never builds one. When no tokenizer can
be loaded, prompts are estimated at 4 characters a token, and the reason is
given beside the count.
"""

import functools
import json
import math
from pathlib import Path

from .jobs import CHARS_PER_TOKEN

#: Profile paths that name a model the workers build themselves (``workers.engine``).
BUILT_IN_MODELS = ("tiny", "tiny-large")
#: The file a finished build of a built-in model holds (``workers.tiny_model``).
BUILD_MARKER = "queue_engine_build.json"


def model_directory(settings, model):
    """The directory of ``model``'s weights and tokenizer, as this machine has it.

    Raises:
        LookupError: a built-in model not built here yet.
    """
    path = settings.models[model].path
    if path not in BUILT_IN_MODELS:
        return Path(path)
    builds = [(json.loads((found / BUILD_MARKER).read_text()).get("version", 0), found)
              for found in Path(settings.models_dir).glob(f"{path}-v*") if (found / BUILD_MARKER).exists()]
    if not builds:
        raise LookupError(f"the built-in model {path!r} is not built on this machine yet "
                          f"(a worker builds it into {settings.models_dir} when it first starts)")
    return max(builds)[1]


@functools.lru_cache(maxsize=16)
def load_tokenizer(directory):
    """``(tokenizer, None)``, or ``(None, why it could not be loaded)``; cached per directory."""
    try:
        from transformers import AutoTokenizer  # seconds to import: only for a dry run

        return AutoTokenizer.from_pretrained(str(directory)), None
    except Exception as e:  # noqa: BLE001 - any failure means "estimate instead"
        return None, f"the tokenizer of {str(directory)!r} could not be loaded ({type(e).__name__}: {e})"


def token_counter(settings, model):
    """A function ``(rows) -> (prompt_tokens, tokenizer_error)`` for ``model``'s rows.

    Chat rows are counted as the worker runs them: through the tokenizer's
    chat template, when it has one.
    """
    try:
        tokenizer, problem = load_tokenizer(model_directory(settings, model))
    except LookupError as e:
        tokenizer, problem = None, str(e)

    def count(rows):
        if tokenizer is None:
            return sum(math.ceil(len(row.text) / CHARS_PER_TOKEN) for row in rows), problem
        texts = [chat_text(tokenizer, row.messages) if row.messages is not None else row.prompt for row in rows]
        return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) if texts else 0, None

    return count


def chat_text(tokenizer, messages):
    """The text the engine runs for chat ``messages`` (``workers.engine``
    applies the chat template the same way), or the contents joined without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(message["content"] for message in messages)
