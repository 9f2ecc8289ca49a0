"""MedSAM: the image encoder, prompt encoder and mask decoder of
segment-anything, and the way MediRound drives them with one [SEG] token."""

from __future__ import annotations

import math
from functools import partial
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._imports import sam_modeling
from .spec import SamEncoderSpec

PROMPT_DIM = 256  # SAM's prompt space; the [SEG] projection maps into it
MASK_IN_CHANS = 16


class MedSAM(nn.Module):
    """SAM parts under the names of the official state dict
    (``image_encoder``, ``prompt_encoder``, ``mask_decoder``)."""

    def __init__(self, enc: SamEncoderSpec):
        super().__init__()
        m = sam_modeling()
        grid = enc.img_size // enc.patch_size
        self.img_size = enc.img_size
        self.image_encoder = m.ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=enc.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(enc.global_attn_indexes),
            window_size=enc.window_size,
            out_chans=enc.out_chans,
        )
        self.prompt_encoder = m.PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=MASK_IN_CHANS,
        )
        self.mask_decoder = m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )

    def dense_positional_encoding(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image grid.

        Computed in the dtype of the gaussian matrix buffer, as the official
        code does (bf16 in its bf16 runs; segment-anything 1.0 would use fp32).
        """
        gauss = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        h, w = self.prompt_encoder.image_embedding_size
        grid = torch.ones((h, w), device=gauss.device, dtype=gauss.dtype)
        y = (grid.cumsum(dim=0) - 0.5) / h
        x = (grid.cumsum(dim=1) - 0.5) / w
        coords = 2 * torch.stack([x, y], dim=-1) - 1
        coords = 2 * math.pi * (coords @ gauss)
        pe = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)
        return pe.permute(2, 0, 1).unsqueeze(0)

    def decode(self, token: torch.Tensor, image_embedding: torch.Tensor, dense_pe: torch.Tensor) -> torch.Tensor:
        """(1, 1, 256, 256) low-resolution logits for one 256-d prompt token."""
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse.to(token.dtype), token.reshape(1, 1, -1)], dim=1)
        low_res, _ = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(token.dtype),
            multimask_output=False,
        )
        return low_res[:, :1]


def postprocess_logits(
    low_res: torch.Tensor, resize_hw: Tuple[int, int], original_hw: Tuple[int, int], img_size: int = 1024
) -> torch.Tensor:
    """(H, W) float32 logits at the original size: up to the padded square,
    cut the padding, then to the original size (bilinear, align_corners False)."""
    x = F.interpolate(low_res.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : resize_hw[0], : resize_hw[1]]
    x = F.interpolate(x, tuple(original_hw), mode="bilinear", align_corners=False)
    return x[0, 0]
