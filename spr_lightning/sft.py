"""``SFTModule``: supervised fine-tuning on grounded chat samples, the stage before DPO.

Loss: the mean token cross-entropy over answer tokens only (``labels`` is ``-100`` on prompt and padding),

    L = -(1 / N) * Σ_{t : labels_t ≠ -100} log p(labels_t | tokens_<t, image),

N the number of answer tokens in the batch. With ``coordinate_label_sigma`` > 0 the answer tokens that are box
coordinates are trained against a Gaussian over the neighbouring bins instead of a one-hot target
(:mod:`spr_lightning.coordinate_labels`). The LM head runs on answer positions only, in chunks under
activation checkpointing (as DPO's log-probs do), so no ``[B, T, V]`` logits tensor is ever built.

Two regimes: LoRA on the language model (default; checkpoints hold only the adapter), or full fine-tuning of
the language model, LM head and projector (``lora=False``; the vision tower stays frozen unless
``full_finetune_vision``). Either way :meth:`SFTModule.export_model` writes a plain transformers model (LoRA
merged into the base) plus processor, which every later stage loads by path.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from spr_lightning.coordinate_labels import CoordinateTargets, coordinate_targets, soft_target_logits
from spr_lightning.grounding_attention import (
    box_queries,
    grounding_attention_loss,
    location_token_values,
    phrase_token_ids,
)
from spr_lightning.logprobs import IGNORE_INDEX
from spr_lightning.models import (
    apply_lora,
    count_parameters,
    language_model_lora_targets,
    load_policy,
    load_processor,
)
from spr_lightning.training import adamw_cosine, keep_trainable_weights

log = logging.getLogger(__name__)

#: Projector modules (trained in full fine-tuning even with the vision tower frozen): LLaVA / LLaVA-OneVision's
#: ``multi_modal_projector`` beside the tower, Qwen2.5-VL's patch ``merger`` inside ``visual``.
PROJECTOR_NAMES = ("multi_modal_projector", "merger")


def _chunk_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                 soft: CoordinateTargets | None = None) -> tuple[Tensor, Tensor]:
    logits = nn.functional.linear(hidden, weight, bias).float()
    nll = torch.logsumexp(logits, dim=-1) - soft_target_logits(logits, targets, soft)
    return nll.sum(), (logits.argmax(dim=-1) == targets).sum()


def answer_token_stats(
    hidden_states: Tensor, lm_head: nn.Module, labels: Tensor, *, chunk_size: int = 1024,
    coordinate_soft_targets: CoordinateTargets | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed negative log-likelihood, greedy-correct count and count of the labelled tokens.

    Args:
        hidden_states: ``[B, T, H]`` last hidden states (position ``t`` predicts token ``t + 1``).
        lm_head: the output projection (an ``nn.Linear``).
        labels: ``[B, T]`` token ids, ``-100`` everywhere but the answer.
        chunk_size: answer positions per LM-head block.
        coordinate_soft_targets: Gaussian targets for coordinate tokens (``None``: one-hot everywhere).

    Returns:
        ``(nll_sum, correct, count)``: fp32 sum of ``-log p`` over labelled tokens (the soft cross-entropy at
        coordinate tokens when ``coordinate_soft_targets`` is given), the number of them that are the
        argmax of their logits (teacher-forced token accuracy), and their number.
    """
    target = labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    selected, targets = hidden_states[:, :-1][rows, cols], target[rows, cols]
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    nll = hidden_states.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, selected.shape[0], chunk_size):
        args = (selected[start : start + chunk_size], weight, bias, targets[start : start + chunk_size],
                coordinate_soft_targets)
        if torch.is_grad_enabled() and selected.requires_grad:
            piece_nll, piece_correct = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            piece_nll, piece_correct = _chunk_stats(*args)
        nll, correct = nll + piece_nll, correct + piece_correct
    return nll, correct, torch.tensor(targets.numel(), device=labels.device)


def freeze_for_full_finetune(model: nn.Module, train_vision: bool = False) -> None:
    """Make the language model, LM head and projector trainable; the vision tower too only if ``train_vision``.

    The tower is found with transformers' own ``get_encoder(modality="image")`` (``vision_tower``, ``visual``, ...);
    projector modules (:data:`PROJECTOR_NAMES`) inside it stay trainable.
    """
    model.requires_grad_(True)
    if train_vision:
        return
    tower = model.get_encoder(modality="image")
    if tower is model or tower is getattr(model, "base_model", None):
        raise ValueError(f"{type(model).__name__}: no vision tower found to freeze; set full_finetune_vision=True")
    tower.requires_grad_(False)
    for name, module in tower.named_modules():
        if name.split(".")[-1] in PROJECTOR_NAMES:
            module.requires_grad_(True)


def projector_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter inside a projector module (:data:`PROJECTOR_NAMES`)."""
    return [(name, param) for name, param in model.named_parameters()
            if any(part in PROJECTOR_NAMES for part in name.split(".")[:-1])]


def _lora_with_modules_to_save(model: nn.Module, hp: Any) -> nn.Module:
    """:func:`~spr_lightning.models.apply_lora`'s adapter (same default targets) plus fully trained modules."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, bias="none",
                        target_modules=hp.lora_target_modules or language_model_lora_targets(model),
                        modules_to_save=list(hp.lora_modules_to_save))
    return get_peft_model(model, config)


class SFTModule(LightningModule):
    """A VLM fine-tuned on grounded (image, prompt, answer) samples with token cross-entropy.

    Args:
        model_name_or_path: the VLM (hub id, local path or ``tiny:<family>``).
        lora: train a LoRA adapter on the language model (``False``: full fine-tuning, see
            ``full_finetune_vision``).
        lora_r: LoRA rank.
        lora_alpha: LoRA α.
        lora_dropout: LoRA dropout.
        lora_target_modules: peft target modules; default: every linear layer of the language model.
        lora_modules_to_save: modules trained in full beside the adapter and merged on export (peft's
            ``modules_to_save``, e.g. ``[lm_head]``: a randomly initialised tiny model cannot sharpen its output
            distribution through LoRA alone, its final norm and LM head being frozen). Ignored without LoRA.
        full_finetune_vision: with ``lora=False``, also train the vision tower (default: frozen; the language
            model, LM head and projector are trained).
        projector_lr_scale: the projector's learning rate as a multiple of ``lr`` (``0``: projector frozen). A
            projector trained from scratch at the language model's rate can turn the image tokens into position
            codes that drown what the objects look like (measured on SPR-Shapes, docs/results.md).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warmup share of the cosine schedule.
        dtype: weight dtype of the model (``float32``, ``bfloat16``, ``float16``, ``auto``).
        gradient_checkpointing: recompute decoder activations in backward.
        chunk_size: answer positions per LM-head block when computing the loss.
        grounding_attention_weight: weight of the auxiliary grounding-attention loss
            (:mod:`spr_lightning.grounding_attention`: before each box, one head looks at the patches the box
            covers); ``0`` (default) is plain SFT. Runs the language model with eager attention.
        grounding_attention_layer: the supervised decoder layer (negative counts from the last).
        grounding_attention_head: the supervised head of that layer.
        grounding_attention_every_coordinate: supervise the positions predicting all four coordinates of each
            box, not only the first.
        grounding_attention_phrase: also supervise the positions that write each box's grounded phrase
            (``<p>..</p>``) to look at the box's patches: naming an object is then reading it.
        grounding_attention_start: share of the run's optimizer steps trained without the auxiliary loss before
            it is switched on (measured on SPR-Shapes: from a random start the supervised head's lookup is
            learned but the coordinates read out of it are not; after plain SFT both are, docs/results.md).
        coordinate_label_sigma: train coordinate tokens against a Gaussian over the neighbouring bins with this
            standard deviation in bins (:mod:`spr_lightning.coordinate_labels`); ``0`` (default) is plain one-hot
            cross-entropy. Needs a bin format written as whole tokens (MiniGPT-v2's ``<0>``...``<100>``).
        coordinate_label_start: share of the run's optimizer steps trained with one-hot coordinate labels before
            the soft ones switch on (measured on SPR-Shapes: soft labels from the first step hurt finding objects,
            as a late continuation they help precision; this makes that recipe one run, docs/sft.md).
        trust_remote_code: allow custom model code from the hub (off unless set).
    """

    def __init__(
        self,
        model_name_or_path: str,
        lora: bool = True,
        lora_r: int = 64,
        lora_alpha: int = 128,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str | None = None,
        lora_modules_to_save: list[str] | None = None,
        full_finetune_vision: bool = False,
        projector_lr_scale: float = 1.0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        chunk_size: int = 1024,
        grounding_attention_weight: float = 0.0,
        grounding_attention_layer: int = -1,
        grounding_attention_head: int = 0,
        grounding_attention_every_coordinate: bool = False,
        grounding_attention_phrase: bool = False,
        grounding_attention_start: float = 0.0,
        coordinate_label_sigma: float = 0.0,
        coordinate_label_start: float = 0.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if full_finetune_vision and lora:
            raise ValueError("full_finetune_vision applies to full fine-tuning; set lora=False with it")
        if projector_lr_scale < 0:
            raise ValueError(f"projector_lr_scale must be >= 0, got {projector_lr_scale}")
        if grounding_attention_weight < 0:
            raise ValueError(f"grounding_attention_weight must be >= 0, got {grounding_attention_weight}")
        if not 0.0 <= grounding_attention_start < 1.0:
            raise ValueError(f"grounding_attention_start must be in [0, 1), got {grounding_attention_start}")
        if coordinate_label_sigma < 0:
            raise ValueError(f"coordinate_label_sigma must be >= 0 bins, got {coordinate_label_sigma}")
        if not 0.0 <= coordinate_label_start < 1.0:
            raise ValueError(f"coordinate_label_start must be in [0, 1), got {coordinate_label_start}")
        if coordinate_label_start > 0 and coordinate_label_sigma == 0:
            raise ValueError("coordinate_label_start switches soft coordinate labels on late; "
                             "set coordinate_label_sigma > 0 with it")
        self.save_hyperparameters()
        self.processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
        # With LoRA the checkpoint carries only the adapter; the frozen base comes from `model_name_or_path`.
        self.strict_loading = not lora
        # Loaded here, not in `configure_model`, so that an optimizer built right after the module sees the
        # trainable parameters (LightningCLI's `--optimizer`).
        self.policy = self._load_policy()
        self._location_values = None
        self._phrase_ids = None
        if grounding_attention_weight > 0:
            self._location_values = location_token_values(self.processor.tokenizer)
            if grounding_attention_phrase:
                self._phrase_ids = phrase_token_ids(self.processor.tokenizer)
            # Only eager attention returns the probabilities the auxiliary loss reads.
            self.base_model.set_attn_implementation("eager")
        self._coordinate_targets = None
        if coordinate_label_sigma > 0:
            try:
                values = location_token_values(self.processor.tokenizer)
            except ValueError as error:
                raise ValueError(f"coordinate_label_sigma={coordinate_label_sigma} on {model_name_or_path}: {error}") \
                    from error
            self._coordinate_targets = coordinate_targets(values, coordinate_label_sigma)

    def _load_policy(self) -> nn.Module:
        hp = self.hparams
        model = load_policy(hp.model_name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        if hp.lora and hp.lora_modules_to_save:
            model = _lora_with_modules_to_save(model, hp)
        elif hp.lora:
            model = apply_lora(model, r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout,
                               target_modules=hp.lora_target_modules)
        else:
            freeze_for_full_finetune(model, train_vision=hp.full_finetune_vision)
        if hp.projector_lr_scale == 0:
            for _, param in projector_parameters(model):
                param.requires_grad_(False)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()  # from_pretrained returns eval mode, which would switch LoRA and model dropout off
        trainable, total = count_parameters(model)
        log.info("SFTModule: %s trainable of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))
        return model

    @property
    def base_model(self) -> nn.Module:
        """The transformers ``*ForConditionalGeneration`` (under the peft wrapper when LoRA is on)."""
        return self.policy.get_base_model() if self.hparams.lora else self.policy

    def sft_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean answer-token cross-entropy and teacher-forced token accuracy of one batch."""
        inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
        base, hp = self.base_model, self.hparams
        supervise = hp.grounding_attention_weight > 0 and self._past_share(hp.grounding_attention_start)
        outputs = base.model(**inputs, use_cache=False, output_attentions=supervise)
        soft = self._coordinate_targets if self._past_share(hp.coordinate_label_start) else None
        if soft is not None and soft.kernel.device != batch["labels"].device:
            soft = self._coordinate_targets = soft.to(batch["labels"].device)
        nll, correct, count = answer_token_stats(outputs.last_hidden_state, base.get_output_embeddings(),
                                                 batch["labels"], chunk_size=hp.chunk_size,
                                                 coordinate_soft_targets=soft)
        count = count.clamp(min=1)
        stats = {"loss": nll / count, "token_accuracy": correct.float() / count, "num_tokens": count.float()}
        if supervise:
            queries = box_queries(batch["input_ids"], batch["labels"], base.config.image_token_id,
                                  self._location_values,
                                  every_coordinate=hp.grounding_attention_every_coordinate,
                                  phrase_ids=self._phrase_ids)
            attention = outputs.attentions[hp.grounding_attention_layer]
            stats["grounding_attention"] = grounding_attention_loss(attention, queries, hp.grounding_attention_head)
            stats["loss"] = stats["loss"] + hp.grounding_attention_weight * stats["grounding_attention"]
        return stats

    def _past_share(self, start: float) -> bool:
        """Whether the run's first ``start`` share of optimizer steps is behind it (always, outside a fit):
        the switch of ``grounding_attention_start`` and ``coordinate_label_start``."""
        if start == 0 or self._trainer is None:
            return True
        return self.trainer.global_step >= start * self.trainer.estimated_stepping_batches

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        stats = self.sft_step(batch)
        size = len(batch["keys"])
        self.log("train/loss", stats["loss"].detach(), prog_bar=True, on_step=True, batch_size=size)
        self.log("train/token_accuracy", stats["token_accuracy"], on_step=True, batch_size=size)
        if "grounding_attention" in stats:
            self.log("train/grounding_attention", stats["grounding_attention"].detach(), prog_bar=True,
                     on_step=True, batch_size=size)
        return stats["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        stats = self.sft_step(batch)
        # Weighted by answer tokens, so the epoch value is the token mean over the whole split.
        weight = int(stats["num_tokens"])
        self.log("val/loss", stats["loss"], prog_bar=True, on_epoch=True, batch_size=weight, sync_dist=True)
        self.log("val/token_accuracy", stats["token_accuracy"], on_epoch=True, batch_size=weight, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        scaled = [p for _, p in projector_parameters(self.policy) if p.requires_grad]
        in_projector = {id(p) for p in scaled}
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad and id(p) not in in_projector]}]
        if scaled:
            groups.append({"params": scaled, "lr": hp.lr * hp.projector_lr_scale})
        return adamw_cosine(groups, hp.lr, hp.weight_decay, hp.warmup_ratio, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA keep only trainable weights (the frozen base is reloaded); otherwise a full checkpoint."""
        if not self.hparams.lora:
            return
        keep_trainable_weights(self, checkpoint)

    def export_model(self, out_dir: str | Path) -> Path:
        """Write a plain transformers model (LoRA merged into the base) and the processor to ``out_dir``.

        With LoRA the adapter is saved, then merged into a fresh copy of the base loaded on CPU, so the
        training model (and its unmerged adapter) is left untouched and no second copy lands on the GPU.
        """
        out = Path(out_dir)
        hp = self.hparams
        if hp.lora:
            from peft import PeftModel

            with tempfile.TemporaryDirectory() as adapter_dir:
                self.policy.save_pretrained(adapter_dir, safe_serialization=True)
                base = load_policy(hp.model_name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            merged.save_pretrained(str(out), safe_serialization=True)
        else:
            self.policy.save_pretrained(str(out), safe_serialization=True)
        self.processor.save_pretrained(str(out))
        return out
