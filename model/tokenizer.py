"""Tokenizers: a tiny byte-level BPE trained on the fly (tiny config), or Phi-3's own.

The tiny tokenizer is trained on a small embedded corpus, deterministically (same corpus, same
settings, same ids), so a tiny model saved by one run reads the same ids in another. Special
tokens take the first ids in a fixed order (pad 0, bos 1, eos 2), which the tiny config relies on.
Both kinds end up as a `PreTrainedTokenizerFast` carrying the xGen-MM additions and the Phi-3
chat template.
"""

from __future__ import annotations

from .config import CHAT_TOKENS, END_OF_CHUNK_TOKEN, IMAGE_TOKEN, PAD_TOKEN, PLACEHOLDER_TOKEN, TINY_VOCAB

SPECIAL_TOKENS = [PAD_TOKEN, "<s>", "<|endoftext|>", IMAGE_TOKEN, PLACEHOLDER_TOKEN, END_OF_CHUNK_TOKEN, *CHAT_TOKENS]
XGENMM_ADDITIONS = [IMAGE_TOKEN, PLACEHOLDER_TOKEN, END_OF_CHUNK_TOKEN]

# Phi-3's chat format; each turn ends with <|end|> and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
A photo of a dog running on the beach next to the sea. Two cats sleep on a red sofa in a living room.
The image contains the text "OPEN" located at the top left of the image. A man in a blue shirt rides
a bicycle down a city street. The picture shows a bowl of fruit: apples, bananas and oranges on a
wooden table. This image showcases a football player (in the center) in action during a match.
A street sign reads "MAIN ST" near a traffic light. What is in the image? Describe the picture in
detail. How many people are there? There are three people standing near a white car. The sky is
clear and the mountains are covered with snow. A plate with a sandwich and a cup of coffee. The text
in the image says "SALE 50% OFF". A small boat floats on a calm lake at sunset. Children play in a
park with green trees. The chart shows sales growing from 2019 to 2024. Question: what color is the
bus? Answer: the bus is yellow. A kitchen with a stove, a sink and a window. An airplane flies over
the clouds. The document is a receipt with a total of 12.99 dollars. A woman holds an umbrella in
the rain. The cat is black and white. The dog is brown. 0 1 2 3 4 5 6 7 8 9 10 100 1000, . ; : ! ?
"""


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Byte-level BPE over the embedded corpus, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token="<s>", eos_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def released_token_ids(initial_tokenizer_len: int) -> dict[str, int]:
    """The ids the release gives its added tokens: the authors append `XGENMM_ADDITIONS` in this
    order after a tokenizer of `initial_tokenizer_len` tokens (Phi-3's 32011 + `<pad>`), so
    `<image>` 32012, `<image placeholder>` 32013, `<|endofchunk|>` 32014."""
    return {tok: initial_tokenizer_len + i for i, tok in enumerate(XGENMM_ADDITIONS)}


def add_xgenmm_tokens(tokenizer):
    """Phi-3's tokenizer + `<pad>` (32011), `<image>`, `<image placeholder>`, `<|endofchunk|>`."""
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": XGENMM_ADDITIONS}, replace_extra_special_tokens=False)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
