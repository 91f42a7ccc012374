"""``DPOModule``: SPR §3.3 — DPO (Eq. 4) on a LoRA policy against a frozen reference.

The reference is, by default, the policy itself with its adapter disabled (one copy of the weights);
a separate frozen ``reference_model`` and precomputed ``ref_logps`` carried by the shards are options.
Checkpoints hold only the trainable (LoRA) weights and optimizer state, never the frozen base.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.logprobs import completion_logps
from spr_lightning.losses import chosen_nll, dpo_loss
from spr_lightning.models import apply_lora, count_parameters, load_policy, load_processor, load_reference
from spr_lightning.shared_prefix import shared_prefix_logps
from spr_lightning.training import adamw_cosine, keep_trainable_weights

log = logging.getLogger(__name__)


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers ``*ForConditionalGeneration`` under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_logps(model: nn.Module, inputs: dict[str, Any], chunk_size: int) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs per row, via the decoder's hidden states and a chunked LM head."""
    base = unwrap_base(model)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden = base.model(**inputs, use_cache=False).last_hidden_state
    return completion_logps(hidden, base.get_output_embeddings(), labels, chunk_size=chunk_size)


class DPOModule(LightningModule):
    """LoRA policy trained with DPO on preference pairs.

    Args:
        model_name_or_path: policy VLM (hub id, local path or ``tiny:<family>``).
        beta: DPO β (SPR: 0.1).
        loss_type: ``sigmoid`` (SPR Eq. 4), ``robust``, ``ipo`` or ``hinge``.
        label_smoothing: ε for ``sigmoid`` (cDPO) and ``robust``.
        lora_r: LoRA rank (SPR: 128).
        lora_alpha: LoRA α (SPR: 256).
        lora_dropout: LoRA dropout.
        lora_target_modules: peft target modules; default: every linear layer of the language model.
        adapter_path: start from this trained adapter instead of a fresh one.
        reference_model: a separate frozen reference (path/id); default: the policy with its adapter disabled.
        reference_adapter_path: adapter applied (frozen) on top of ``reference_model``.
        use_precomputed_ref: use ``ref_chosen_logps``/``ref_rejected_logps`` from the batch when present.
        lr: AdamW peak learning rate (SPR: 1e-5 Ferret/CogVLM, 2e-7 LLaVA-OneVision).
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warmup share of the cosine schedule (authors' scripts: 0.1).
        dtype: weight dtype of the base model (``float32``, ``bfloat16``, ``float16``, ``auto``).
        gradient_checkpointing: recompute decoder activations in backward.
        logps_chunk_size: completion positions per LM-head block when computing log-probs.
        trust_remote_code: allow custom model code from the hub (off unless set).
        forward_mode: ``concat`` runs prompt + completion rows for chosen and rejected separately; ``shared_prefix``
            encodes image and prompt once per pair and runs both completions on its KV cache (same log-probs and
            gradients, less compute; see ``docs/dpo.md``). Families it doesn't know fall back to ``concat``.
        rpo_alpha: weight α of the chosen answers' NLL per token added to the DPO loss (RPO; TRL's ``rpo_alpha``,
            whose paper uses 1.0). ``None`` (default, SPR's Eq. 4): plain DPO.
    """

    FORWARD_MODES = ("concat", "shared_prefix")

    def __init__(
        self,
        model_name_or_path: str,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        lora_r: int = 128,
        lora_alpha: int = 256,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str | None = None,
        adapter_path: str | None = None,
        reference_model: str | None = None,
        reference_adapter_path: str | None = None,
        use_precomputed_ref: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        logps_chunk_size: int = 1024,
        trust_remote_code: bool = False,
        forward_mode: str = "concat",
        rpo_alpha: float | None = None,
    ) -> None:
        super().__init__()
        if forward_mode not in self.FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {self.FORWARD_MODES}, got {forward_mode!r}")
        if rpo_alpha is not None and rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0 (or None for plain DPO), got {rpo_alpha}")
        self.save_hyperparameters()
        self.processor = load_processor(model_name_or_path, trust_remote_code=trust_remote_code)
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        # Checkpoints carry only LoRA weights; the frozen base comes from `model_name_or_path`.
        self.strict_loading = False
        # Loaded here rather than in `configure_model` so that LightningCLI's `--optimizer` (which
        # instantiates the optimizer right after the module) sees the LoRA parameters.
        self._load_models()

    @property
    def pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _load_models(self) -> None:
        """Load the policy with its LoRA adapter (and the optional separate reference)."""
        hp = self.hparams
        model = load_policy(hp.model_name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        self.policy = apply_lora(model, r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout,
                                 target_modules=hp.lora_target_modules, adapter_path=hp.adapter_path)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.policy.enable_input_require_grads()
        if hp.reference_model is not None:
            self.reference = load_reference(hp.reference_model, adapter_path=hp.reference_adapter_path, dtype=hp.dtype,
                                            trust_remote_code=hp.trust_remote_code)
        trainable, total = count_parameters(self.policy)
        log.info("DPOModule: %s trainable of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))

    @contextlib.contextmanager
    def _reference_mode(self):
        """Policy with its adapter disabled, in eval mode, without gradients."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), self.policy.disable_adapter():
                yield self.policy
        finally:
            self.policy.train(was_training)

    def reference_logps(self, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Reference log-probs of the concatenated rows (``[2B]``) and their token counts."""
        return self._reference_forward(lambda model: sequence_logps(model, inputs, self.hparams.logps_chunk_size))

    def _reference_forward(self, forward: Callable[[nn.Module], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """``forward`` applied to the reference (separate model or disabled adapter), without gradients."""
        if self.reference is not None:
            with torch.no_grad():
                return forward(self.reference)
        with self._reference_mode() as reference:
            return forward(reference)

    def dpo_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Loss and statistics of one batch (chosen + rejected forward, concatenated or on a shared prefix)."""
        chunk = self.hparams.logps_chunk_size
        if self.hparams.forward_mode == "shared_prefix":
            def forward(model: nn.Module) -> tuple[Tensor, Tensor]:
                return shared_prefix_logps(model, batch, self.pad_id, chunk)
        else:
            inputs = concatenated_inputs(batch, self.pad_id)

            def forward(model: nn.Module) -> tuple[Tensor, Tensor]:
                return sequence_logps(model, inputs, chunk)
        batch_size = batch["chosen_input_ids"].shape[0]
        logps, counts = forward(self.policy)
        if self.hparams.use_precomputed_ref and "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        else:
            ref_logps, _ = self._reference_forward(forward)
            ref_chosen, ref_rejected = ref_logps[:batch_size], ref_logps[batch_size:]
        return self._loss_and_stats(logps, counts, ref_chosen, ref_rejected, batch_size)

    def _loss_and_stats(self, logps: Tensor, counts: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                        batch_size: int) -> dict[str, Tensor]:
        chosen, rejected = logps[:batch_size], logps[batch_size:]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen.to(chosen.device), ref_rejected.to(chosen.device),
            beta=self.hparams.beta, loss_type=self.hparams.loss_type, label_smoothing=self.hparams.label_smoothing,
            chosen_lengths=counts[:batch_size], rejected_lengths=counts[batch_size:],
        )
        stats = {
            "loss": losses.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        if self.hparams.rpo_alpha is not None:
            nll = chosen_nll(chosen, counts[:batch_size])
            stats["loss"] = stats["loss"] + self.hparams.rpo_alpha * nll
            stats["nll_loss"] = nll.detach()
        return stats

    def _log_stats(self, stats: dict[str, Tensor], stage: str, batch_size: int) -> None:
        """TRL's names: ``train/loss`` and bare ``rewards/*``, ``logps/*`` in training; ``val/...`` in validation."""
        training = stage == "train"
        for name, value in stats.items():
            key = f"{stage}/loss" if name == "loss" else (name if training else f"{stage}/{name}")
            self.log(key, value.detach(), prog_bar=name in ("loss", "rewards/accuracies"), on_step=training,
                     on_epoch=not training, batch_size=batch_size, sync_dist=not training)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        stats = self.dpo_step(batch)
        self._log_stats(stats, "train", batch["chosen_input_ids"].shape[0])
        return stats["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_stats(self.dpo_step(batch), "val", batch["chosen_input_ids"].shape[0])

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return adamw_cosine(params, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_ratio,
                            self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: the frozen base is reloaded from ``model_name_or_path``."""
        keep_trainable_weights(self, checkpoint)
