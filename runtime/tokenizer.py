"""ChatGLM3 prompt tokenization for Kolors with sentencepiece alone.

Reproduces diffusers' ``diffusers.pipelines.kolors.tokenizer.ChatGLMTokenizer``
as the Kolors pipeline calls it::

    tokenizer(prompt, padding="max_length", max_length=256, truncation=True, return_tensors="pt")

- Text becomes sentencepiece *pieces*, and each piece maps to an id through
  the ChatGLM special-token table first, then the sentencepiece vocabulary.
  So a piece spelled like a special token (e.g. a vocabulary piece ``sop``)
  gets the special id, exactly as diffusers' ``convert_token_to_id`` does.
- No text is matched as a special token (``encode_special_tokens=False``,
  and transformers 5 registers no added tokens for this class): a literal
  ``[gMASK]`` or ``</s>`` in a prompt is ordinary text.
- Truncation keeps the first ``max_length - 2`` pieces (transformers reserves
  room for the two prefix tokens), then ``[gMASK]``, ``sop`` go in front.
- Padding is on the left with the unk id; the attention mask is 0 on pads,
  position ids are 0 on pads and then 0..n-1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .spec import TEXT_LENGTH

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
# ChatGLM3's special tokens, numbered after the sentencepiece vocabulary in this order.
SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
PREFIX_TOKENS = ("[gMASK]", "sop")


class TokenizerError(InputError):
    """The tokenizer model cannot be loaded or the prompts cannot be tokenized."""


def check_text(name: str, text: str, error: type) -> None:
    """Raise ``error`` when ``text`` is no Unicode text that UTF-8 (and so sentencepiece) can encode: a lone
    surrogate such as ``"\\ud800"``, which JSON can spell and Python decodes, and which sentencepiece refuses
    with an opaque pybind11 RuntimeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(f"{name}: character {err.start} ({text[err.start:err.end]!r}) is a lone surrogate, not Unicode "
                    "text; send valid UTF-8") from None


class ChatGLMTokenizer:
    """Kolors prompts -> int64 ``input_ids``, ``attention_mask``, ``position_ids`` [B, max_length]."""

    def __init__(self, sp_model, source: str = "tokenizer.model", max_length: int = TEXT_LENGTH):
        if max_length < len(PREFIX_TOKENS) + 1:
            raise TokenizerError(
                f"tokenizer {source}: max_length must leave room for the {len(PREFIX_TOKENS)} prefix tokens "
                f"and one piece, found {max_length}"
            )
        self.sp = sp_model
        self.source = source
        self.max_length = int(max_length)
        vocab = sp_model.vocab_size()
        self.special_ids = {name: vocab + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = vocab + len(SPECIAL_TOKENS)
        self.pad_id = sp_model.unk_id()
        self.prefix_ids = [self.special_ids[name] for name in PREFIX_TOKENS]

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = TEXT_LENGTH) -> "ChatGLMTokenizer":
        """Load ``tokenizer.model``, or a folder holding it (the checkpoint's ``tokenizer/``)."""
        import sentencepiece as spm

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer: {path} not found; pass the ChatGLM sentencepiece {TOKENIZER_FILE} "
                "or the folder holding it (the engine folder carries a copy)"
            )
        try:
            sp_model = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(
                f"tokenizer: {path} is not a sentencepiece model ({err}); "
                f"copy {TOKENIZER_FILE} from the checkpoint's tokenizer folder"
            ) from err
        if sp_model.unk_id() < 0:
            raise TokenizerError(f"tokenizer: {path} has no unk piece; ChatGLM pads with the unk id")
        return cls(sp_model, source=str(path), max_length=max_length)

    def piece_ids(self, text: str) -> list[int]:
        """The ids of ``text`` without prefix, truncation or padding."""
        check_text("prompt", text, TokenizerError)
        special, to_id = self.special_ids, self.sp.piece_to_id
        return [special[p] if p in special else to_id(p) for p in self.sp.encode(text, out_type=str)]

    def __call__(self, prompts: Sequence[str] | str) -> dict[str, np.ndarray]:
        """Tokenize a batch; a bare string is a batch of one."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TokenizerError(f"tokenizer: expected a non-empty list of prompt strings, found {prompts!r:.80}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TokenizerError(
                    f"tokenizer: prompt {i} is a {type(prompt).__name__}, expected str; "
                    "pass an empty string for no prompt"
                )
        batch, length = len(prompts), self.max_length
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int64)  # [B, L]
        attention_mask = np.zeros((batch, length), dtype=np.int64)  # [B, L]
        position_ids = np.zeros((batch, length), dtype=np.int64)  # [B, L]
        room = length - len(self.prefix_ids)
        for row, prompt in enumerate(prompts):
            ids = self.piece_ids(prompt)
            if len(ids) > room:
                logger.warning(
                    "prompt %d is %d tokens long; kept the first %d and dropped %d (Kolors reads %d tokens "
                    "including the %d prefix tokens)",
                    row, len(ids), room, len(ids) - room, length, len(self.prefix_ids),
                )
                ids = ids[:room]
            ids = self.prefix_ids + ids
            n = len(ids)
            input_ids[row, length - n :] = ids
            attention_mask[row, length - n :] = 1
            position_ids[row, length - n :] = np.arange(n)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, for logs and tests: pads and special tokens dropped."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.sp.vocab_size() and int(i) != self.pad_id]
        return self.sp.decode(keep)


__all__ = ["ChatGLMTokenizer", "TokenizerError", "check_text", "SPECIAL_TOKENS", "PREFIX_TOKENS", "TOKENIZER_FILE"]
