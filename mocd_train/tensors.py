"""Small tensor helpers shared by the value model, the decoders and distillation (torch only)."""

from __future__ import annotations

import torch


def positions(mask: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """Position ids from an attention mask: the count of real tokens before each column, so left padding, right
    padding and padding inside a sequence (finished branches) all give the positions an unpadded sequence would have.
    `last`: only the last N columns (the new tokens after a cached prefix)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos if last is None else pos[:, -last:]


def left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → left-padded ids [N, L] and attention mask, on `device`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)
