"""A byte-level tokenizer built in code: the embedded default needs no tokenizer files and no network.

Token ids 0-255 are the raw UTF-8 bytes, so any text round-trips exactly; three special tokens follow. The tokenizer
is a regular ``transformers`` fast tokenizer: it saves with ``save_pretrained`` and reloads with ``AutoTokenizer``,
and it carries a small chat template so the chat code path is the one exercised by default.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["BYTE_VOCAB_SIZE", "CHAT_TEMPLATE", "make_byte_tokenizer", "PAD", "BOS", "EOS"]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
BYTE_VOCAB_SIZE = 259
"""256 byte tokens (ids 0-255 = byte values) + ``<pad>`` (256), ``<s>`` (257), ``</s>`` (258)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ':' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant:' }}{% endif %}"
)
"""Compact on purpose (byte tokens are expensive): ``<s>user:text</s><s>assistant:``. A full conversation renders
as the generation prompt followed by ``answer</s>``, so training and generation see the same tokens."""


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer of the embedded default.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len(tok) == BYTE_VOCAB_SIZE``, pad/bos/eos set, right padding, no
        automatically added special tokens, and :data:`CHAT_TEMPLATE` as its chat template.
    """
    # GPT-2's byte -> printable-unicode map, so that the ByteLevel pre-tokenizer/decoder handle every byte; a BPE
    # without merges then emits exactly one token per byte. Ids follow byte values.
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, BOS, EOS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        model_max_length=1 << 30,
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == BYTE_VOCAB_SIZE, len(tok)
    return tok
