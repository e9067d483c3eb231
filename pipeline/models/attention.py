"""Attention kernels, and the cross-attention with its text K/V cache.

- :func:`attend`: softmax attention on [B, L, H, D] tensors through the configured backend: ``sdpa``
  (torch's ``scaled_dot_product_attention``, which picks cuDNN / flash / memory-efficient / math
  itself), ``flash2`` (``flash_attn.flash_attn_func``), ``flash3`` (``flash_attn_interface``, Hopper),
  ``flash4`` (``flash_attn.cute``). A flash backend takes no mask: a key-padding mask (the slots of a
  batch whose KV windows are not yet full) is run slot by slot on the unmasked keys, exactly; any other
  mask is an error naming the backend.
- :class:`TextKVCache` and :class:`CrossAttnProcessor`: ``attn2`` of each block projects the text
  states to keys/values (``to_k``, ``norm_k``, ``to_v``) once per (prompt, block) and reuses them while
  the prompt is unchanged. The caller names each slot's text states with a key (the prompt: the text
  encoder is a pure function of it); a slot without a key, or a model with the cache off, projects them
  every forward. A prompt change is a new key, so chunks of the old and the new prompt (in flight
  together after a soft change) and sessions with different prompts share one batch.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import WanAttention

BACKENDS = ("sdpa", "flash2", "flash3", "flash4")
FLASH_MODULES = {"flash2": "flash_attn", "flash3": "flash_attn_interface", "flash4": "flash_attn.cute"}


def backend_installed(backend: str) -> bool:
    """Whether ``backend``'s module can be imported here (sdpa always)."""
    if backend == "sdpa":
        return True
    try:
        return importlib.util.find_spec(FLASH_MODULES[backend]) is not None
    except ImportError:  # flash_attn.cute when flash_attn itself is absent
        return False


def _flash(backend: str) -> Callable[..., Any]:
    if backend == "flash2":
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    elif backend == "flash3":
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    else:
        from flash_attn.cute import flash_attn_func  # type: ignore[import-not-found]
    return flash_attn_func  # type: ignore[no-any-return]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
    lengths: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D], mask bool [B or 1, 1, 1 or Lq, Lk] (True: may attend)
    -> [B, Lq, H, D].

    ``lengths``: slot i's keys are its first ``lengths[i]``, the rest padding. Slots are then attended in groups
    of one length with the padding cut off, never through a mask: a padded, masked softmax sums in another
    order and rounds differently, so a slot's output would depend on the other slots of its micro-batch (and a
    ring of stages, which splits a tick into micro-batches, would not give the frames of one process)."""
    if lengths is not None:
        if len(lengths) != len(q) or mask is not None:
            raise ValueError(f"lengths {lengths} for a batch of {len(q)} (and no mask besides) are not allowed")
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            return attend(q, k[:, : lengths[0]], v[:, : lengths[0]], None, backend)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for n, slots in groups.items():
            at = torch.tensor(slots, device=q.device)
            out[at] = attend(q[at], k[at, :n], v[at, :n], None, backend)
        return out
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if mask is not None:
        if mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(f"attention={backend!r} takes no mask of shape {tuple(mask.shape)}; use attention: sdpa")
        keep = mask[:, 0, 0].expand(q.shape[0], -1)  # [B, Lk]: a key-padding mask, slot by slot
        return torch.cat(
            [attend(q[i : i + 1], k[i : i + 1, keep[i]], v[i : i + 1, keep[i]], None, backend) for i in range(len(q))]
        )
    out = _flash(backend)(q, k.contiguous(), v.contiguous(), causal=False)  # k, v may be expanded views
    return out[0] if isinstance(out, tuple) else out  # flash4 (and some flash3 builds) also return the LSE


class TextKVCache:
    """Keys/values of the text states per (key, block), and the text states themselves per key (made by
    the first stage's text embedder); the ``capacity`` most recent keys kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, dict[int, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.misses = 0  # projections made (tests, benchmarks)
        self._states: OrderedDict[Hashable, torch.Tensor] = OrderedDict()  # key -> text states [Lt, E]

    def get(self, key: Hashable, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.get(block)

    def put(self, key: Hashable, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.misses += 1
        self._entries.setdefault(key, {})[block] = (k, v)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def states(self, key: Hashable) -> torch.Tensor | None:
        """The text states [Lt, E] the text embedder made of ``key``'s text, if kept."""
        hit = self._states.get(key)
        if hit is not None:
            self._states.move_to_end(key)
        return hit

    def keep_states(self, key: Hashable, states: torch.Tensor) -> None:
        self._states[key] = states
        self._states.move_to_end(key)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self._states.clear()

    def __len__(self) -> int:
        return len(self._entries)


class CrossAttnProcessor:
    """``attn2`` of one block: diffusers' ``WanAttnProcessor`` for text (no image branch), with the text's
    keys/values from ``cache`` when the slots are named (``text_keys``, set by the caller per forward)."""

    def __init__(self, block_index: int, cache: TextKVCache | None, backend: str = "sdpa") -> None:
        self.block_index = block_index
        self.cache = cache
        self.backend = backend
        self.text_keys: tuple[Hashable, ...] | None = None  # per slot; None: project every forward

    def _project(self, attn: WanAttention, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """enc [B, Lt, E] -> keys, values [B, Lt, H, D]."""
        k = attn.norm_k(attn.to_k(enc)).unflatten(2, (attn.heads, -1))
        return k, attn.to_v(enc).unflatten(2, (attn.heads, -1))

    def _keys_values(self, attn: WanAttention, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        names, cache = self.text_keys, self.cache
        if cache is None or names is None:
            return self._project(attn, enc)
        if len(names) != len(enc):
            raise ValueError(f"{len(names)} text keys for a batch of {len(enc)} slots")
        found: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, name in enumerate(names):
            if name in found:
                continue
            hit = cache.get(name, self.block_index)
            if hit is None:
                k, v = self._project(attn, enc[i : i + 1])
                hit = (k[0], v[0])
                cache.put(name, self.block_index, *hit)
            found[name] = hit
        if len(found) == 1:  # one prompt for the whole batch: a view, no copy
            k, v = next(iter(found.values()))
            return k.expand(len(enc), *k.shape), v.expand(len(enc), *v.shape)
        return torch.stack([found[n][0] for n in names]), torch.stack([found[n][1] for n in names])

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attn.add_k_proj is not None or attn.fused_projections:
            raise TypeError("CrossAttnProcessor is attn2 of a text-only Wan block with unfused projections")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        k, v = self._keys_values(attn, encoder_hidden_states)  # [B, Lt, H, D]
        out = attend(q, k, v, attention_mask, self.backend).flatten(2).type_as(q)  # [B, L, E]
        return attn.to_out[0](out)
