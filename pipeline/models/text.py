"""Text conditioning: a UMT5 encoder, as Wan uses, behind a small cache of encoded prompts.

The ``tiny`` preset uses a tiny randomly initialised UMT5 and :class:`ByteTokenizer`, which needs no
download (UTF-8 bytes are the vocabulary); the trained ``demo`` preset a :class:`WordTokenizer` of its
caption grammar's words. Real presets use the checkpoint's own tokenizer.
Output, as in diffusers' WanPipeline: [text_len, text_dim] with every position past the prompt's
tokens set to zero.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; 0 = pad, 1 = end of sequence, 2 = unknown."""

    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + 3

    def encode(self, text: str, max_length: int) -> tuple[list[int], list[int]]:
        ids = [*[b + self.offset for b in text.encode("utf-8")][: max_length - 1], self.eos_id]
        mask = [1] * len(ids)
        pad = max_length - len(ids)
        return ids + [self.pad_id] * pad, mask + [0] * pad

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab_size": self.vocab_size}))


WORD_TOKENIZER_FILE = "words.json"


class WordTokenizer:
    """Whole words of a closed vocabulary (the ``demo`` model's caption grammar): id = index + 3;
    0 = pad, 1 = end of sequence, 2 = a word outside the vocabulary. Case and punctuation are ignored."""

    pad_id, eos_id, unk_id, offset = 0, 1, 2, 3

    def __init__(self, words: list[str]) -> None:
        if len(set(words)) != len(words) or not all(w and w == w.lower() and w.isalpha() for w in words):
            raise ValueError(f"word tokenizer vocabulary {words!r}: needs distinct lower-case words")
        self.words = list(words)
        self._ids = {w: i + self.offset for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + self.offset

    def split(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary."""
        return [w for w in self.split(text) if w not in self._ids]

    def encode(self, text: str, max_length: int) -> tuple[list[int], list[int]]:
        ids = [*[self._ids.get(w, self.unk_id) for w in self.split(text)][: max_length - 1], self.eos_id]
        mask = [1] * len(ids)
        pad = max_length - len(ids)
        return ids + [self.pad_id] * pad, mask + [0] * pad

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / WORD_TOKENIZER_FILE).write_text(json.dumps({"type": "words", "words": self.words}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> WordTokenizer:
        path = Path(folder) / WORD_TOKENIZER_FILE
        data = json.loads(path.read_text())
        if data.get("type") != "words" or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: not a word tokenizer file (needs type='words' and a list of words)")
        return cls(data["words"])


class TextEncoder:
    """prompt -> conditioning [text_len, text_dim] on ``device`` (None: the encoder's; the DiT's when the
    encoder runs elsewhere, e.g. on the CPU with ``offload: text``); the last ``cache_size`` prompts are kept."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        text_len: int,
        cache_size: int = 32,
        device: torch.device | None = None,
    ) -> None:
        self.encoder = encoder
        self.device = device
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _tokens(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.tokenizer, ByteTokenizer | WordTokenizer):
            ids, mask = self.tokenizer.encode(prompt, self.text_len)
            return torch.tensor([ids]), torch.tensor([mask])
        out = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        device = next(self.encoder.parameters()).device
        ids, mask = self._tokens(prompt)
        states = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state[0]
        n = int(mask.sum())
        states = torch.cat([states[:n], states.new_zeros(self.text_len - n, states.shape[-1])])  # [text_len, text_dim]
        if self.device is not None:
            states = states.to(self.device)
        self._cache[prompt] = states
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return states
