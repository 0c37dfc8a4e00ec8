"""Build the project's own tiny Llama model, because nothing can be downloaded.

The tokenizer is a byte-level BPE trained on text that every CPython ships
(the pydoc topics and the licence), the weights come from a fixed seed and a
short, fixed training run on the same text, so the same machine always builds
the same model and its output reads like Python documentation, not noise.

torch, tokenizers and transformers are imported inside the functions that
use them: a worker whose model is already built never pays for them.
"""

import json
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: name -> (hidden size, intermediate size, layers, heads, training steps)
SIZES = {
    "small": (128, 512, 2, 4, 200),
    "large": (512, 1536, 4, 8, 30),
}

BUILD_VERSION = 1
SEED = 1234
VOCAB_SIZE = 3000


def corpus_text():
    """The training text: every pydoc topic, then the CPython licence."""
    from pydoc_data.topics import topics

    parts = [topics[name] for name in sorted(topics)]
    licence = Path(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "LICENSE.txt")
    if licence.exists():
        parts.append(licence.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def is_built(directory):
    """True when ``directory`` holds a finished build of this version."""
    marker = Path(directory, "queue_engine_build.json")
    return marker.exists() and json.loads(marker.read_text()).get("version") == BUILD_VERSION


def build_tiny_model(directory, size="small", log=print):
    """Build the tokenizer and weights into ``directory`` (created if needed).

    Args:
        directory: where the Hugging Face model files go.
        size: ``"small"`` (1.3M parameters, tests and the demo) or ``"large"``
            (hidden size 512, for throughput benchmarks).
        log: called with progress lines.

    Returns:
        The directory as a :class:`Path`.
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = corpus_text()
    log(f"training a tokenizer on {len(text):,} characters of CPython's own text")
    tokenizer = _train_tokenizer(text)
    tokenizer.save_pretrained(directory)
    log(f"training the {size} model ({SIZES[size][4]} steps, fixed seed)")
    model = _train_model(tokenizer, text, size, log)
    model.save_pretrained(directory, safe_serialization=True)
    Path(directory, "queue_engine_build.json").write_text(
        json.dumps({"version": BUILD_VERSION, "size": size, "seed": SEED})
    )
    log(f"tiny model ready in {directory}")
    return directory


def _train_tokenizer(text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _train_model(tokenizer, text, size, log):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, steps = SIZES[size]
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    seq_len, batch = 128, 32
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        inputs = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps} loss {loss.item():.2f}")
    model.eval()
    return model
