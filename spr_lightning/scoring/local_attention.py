"""Local attention for open_clip ViTs: pool the image embedding from the patches of one region only.

SPR §3.2: "we feed the original image into CLIP and replace the final layer of the vision encoder that
aggregates the embeddings with a local-attention layer", so that the full-image score reflects the queried
region while its patches still carry context from the whole image through the earlier blocks.

Which step aggregates depends on the tower, and each is replaced by its masked twin, built from the tower's own
modules (no weights are copied):

* class-token pooling (``pool_type="tok"``, all OpenAI/LAION CLIP ViTs, e.g. ViT-L-14-336): in the **last**
  block only the class token's output is pooled, so the last block is run for the class token alone, with its
  attention keys restricted to ``{cls} ∪ region patches`` (``key_padding_mask``); then ``ln_post`` and ``proj``
  as usual. The other tokens' outputs of the last block are never used, so computing only the class row is
  exact, and it avoids a ``[B·heads, L, L]`` mask (≈0.7 GB for 32 ViT-L/336 images).
* mean pooling (``pool_type="avg"``): the mean is taken over the region patches only.
* attentional pooler (``attn_pool``, CoCa-style towers): the pooler's keys are restricted to
  ``{prefix tokens} ∪ region patches``.

Other towers (timm, ModifiedResNet, custom residual blocks, the "parallel"/"cascade" pooler pairs that open_clip
marks untested) are refused by :func:`check_local_attention_support` with an error that says why.

Which patches belong to the region (``region_patch_mask``): the image is padded to a square (so resizing keeps
the whole image and the region) and resized to the tower's input, so a box normalised to the padded square maps
linearly onto the patch grid. A patch is *inside* when its centre lies inside the box (closed interval); the
patch that contains the box centre is always inside, so a region smaller than a patch still has one patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn


def check_local_attention_support(visual: nn.Module) -> VisionTransformer:
    """Return ``visual`` if local attention can replace its pooling step, else raise ``TypeError``.

    Args:
        visual: ``model.visual`` of an open_clip model.
    """
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"local attention needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(timm and ModifiedResNet towers have no class-token/attention pooling step to restrict)"
        )
    if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
        raise TypeError("local attention supports open_clip's default ResidualAttentionBlock, not custom blocks")
    if visual.attn_pool is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise TypeError("local attention does not support 'parallel'/'cascade' attentional pooling")
    elif visual.pool_type not in ("tok", "avg"):
        raise TypeError(f"local attention needs pool_type 'tok' or 'avg', got {visual.pool_type!r}")
    return visual


def region_patch_mask(box: Sequence[float], grid_size: tuple[int, int]) -> torch.Tensor:
    """Patches of a ``grid_size`` grid that belong to ``box``.

    Args:
        box: ``xyxy`` normalised to the square input (``[0, 1]``; values outside are allowed).
        grid_size: ``(rows, cols)`` of the patch grid.

    Returns:
        bool ``[rows * cols]`` in the tower's row-major token order; ``True`` for patches whose centre lies in
        the box, plus the patch containing the box centre.
    """
    rows, cols = grid_size
    x1, y1, x2, y2 = (float(v) for v in box)
    cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
    inside = ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
    centre_row = min(max(int((y1 + y2) / 2 * rows), 0), rows - 1)
    centre_col = min(max(int((x1 + x2) / 2 * cols), 0), cols - 1)
    inside[centre_row, centre_col] = True
    return inside.flatten()


def _run_blocks(visual: VisionTransformer, x: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
    """Run ``blocks`` on batch-first tokens, honouring the transformer's layout."""
    batch_first = visual.transformer.batch_first
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


def _class_token_last_block(block: ResidualAttentionBlock, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """The last block's output for token 0 only, attending to the keys where ``key_keep`` (``[B, L]``) is set.

    Same operations as ``ResidualAttentionBlock.forward`` restricted to one query row.
    """
    normed = block.ln_1(x)
    query = normed[:, :1]
    if not block.attn.batch_first:
        query, normed = query.transpose(0, 1), normed.transpose(0, 1)
    attended = block.attn(query, normed, normed, key_padding_mask=~key_keep, need_weights=False)[0]
    if not block.attn.batch_first:
        attended = attended.transpose(0, 1)
    cls = x[:, :1] + block.ls_1(attended)
    cls = cls + block.ls_2(block.mlp(block.ln_2(cls)))
    return cls


def _masked_attn_pool(visual: VisionTransformer, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """``AttentionalPooler.forward`` with its keys restricted, then the CoCa branch of ``VisionTransformer._pool``."""
    pool = visual.attn_pool
    keys = pool.ln_k(x)
    query = pool.ln_q(pool.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    out = pool.attn(query, keys, keys, key_padding_mask=~key_keep, need_weights=False)[0]
    pooled, _ = visual._global_pool(visual.ln_post(out))
    return pooled


def encode_image_local(visual: nn.Module, pixels: torch.Tensor, patch_keep: torch.Tensor) -> torch.Tensor:
    """Image embeddings whose pooling step sees only the kept patches (unnormalised, like ``visual(pixels)``).

    With every patch kept this equals ``visual(pixels)`` up to float rounding (tested).

    Args:
        visual: a supported open_clip ViT (see :func:`check_local_attention_support`).
        pixels: ``[B, 3, H, W]`` preprocessed images at the tower's input size.
        patch_keep: bool ``[B, rows * cols]`` from :func:`region_patch_mask`.

    Returns:
        ``[B, output_dim]``.
    """
    visual = check_local_attention_support(visual)
    num_patches = visual.grid_size[0] * visual.grid_size[1]
    if patch_keep.shape != (pixels.shape[0], num_patches):
        raise ValueError(f"patch_keep must be [{pixels.shape[0]}, {num_patches}], got {tuple(patch_keep.shape)}")
    patch_keep = patch_keep.to(device=pixels.device, dtype=torch.bool)
    x = visual._embeds(pixels)
    prefix = x.shape[1] - num_patches
    key_keep = torch.cat([patch_keep.new_ones(x.shape[0], prefix), patch_keep], dim=1)
    blocks = visual.transformer.resblocks
    if visual.attn_pool is not None:
        pooled = _masked_attn_pool(visual, _run_blocks(visual, x, blocks), key_keep)
    elif visual.pool_type == "tok":
        x = _run_blocks(visual, x, blocks[:-1])
        pooled = visual.ln_post(_class_token_last_block(blocks[-1], x, key_keep)[:, 0])
    else:  # "avg": the mean over region patches replaces the mean over all patches
        tokens = _run_blocks(visual, x, blocks)[:, prefix:]
        if not visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        weights = patch_keep.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(pooled)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def normalized(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise in float32 so cosine similarities of half-precision towers are not rounded twice."""
    return F.normalize(features.float(), dim=-1)
