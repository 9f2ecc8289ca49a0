"""Judgment & Correction (stage 2): a quality judge on the [SEG] token and a
correction MLP that replaces a token judged poor."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

JCM_THRESHOLD = 0.6  # official --jcm_threshold: refine when score <= this
JCM_HIDDEN = 512


class ThreeLayerMLP(nn.Module):
    """Linear, GELU (exact), Linear, GELU, Linear (names as in the checkpoint)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_hidden)
        self.fc3 = nn.Linear(dim_hidden, dim_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class JudgmentCorrection(nn.Module):
    def __init__(self, dim: int, hidden: int = JCM_HIDDEN):
        super().__init__()
        self.quality = ThreeLayerMLP(dim, hidden, 1)  # official: mask_quality_MLP
        self.refine = ThreeLayerMLP(dim, hidden, dim)  # official: refine_MLP

    def score(self, token: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.quality(token))

    def forward(self, token: torch.Tensor, threshold: float = JCM_THRESHOLD) -> Tuple[torch.Tensor, float, bool]:
        """(token to use, score, refined). The correction replaces the token
        (no residual); the language model is not touched."""
        score = float(self.score(token).float().reshape(-1)[0])
        if score <= threshold:
            return self.refine(token), score, True
        return token, score, False
