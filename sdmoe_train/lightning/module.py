"""PretrainModule: next-token pretraining of a :class:`Transformer` with Lightning.

Owns loss assembly, logging, the optimizer and the per-step MoE hooks. Hook order inside one
optimizer step (Lightning 2.6, any ``accumulate_grad_batches``):

1. ``training_step`` + backward for every micro-batch; routing counts accumulate in ``_load_since_step_LE``;
2. ``on_before_optimizer_step``: gradients are complete (accumulated and, under DDP, all-reduced), not
   yet clipped: split the SD-MoE expert gradients into common and unique parts, then log the gradient
   norm and learning rate;
3. ``optimizer_step``: the AdamW step, then the aux-loss-free bias update from the routing counts
   summed over micro-batches *and* ranks, so every rank applies the same bias change, then the SD-MoE
   step end (strict update projection, step count, basis refresh every ``refresh_every`` steps).

The transformer is built on the meta device in ``__init__`` (shapes only, so paper-scale presets construct
anywhere) and materialised in ``configure_model``: experts sharded first, then weights allocated on the
rank's device with exactly the values eager construction gives them (:mod:`sdmoe_train.models.meta_init`),
then ``init_from`` weights loaded and decoder blocks compiled (``parallel.compile``).

SD-MoE (arXiv 2602.12556) is applied in ``__init__``, before any optimizer exists; with
``sdmoe.enabled: false`` (or no ``sdmoe``) the model is the vanilla one and none of its hooks do work.
SSMoE spectral routing (arXiv 2605.30992) is applied after it; its U is computed once the weights (and any
``init_from`` weights) are in place, and recomputed every ``ssmoe.refresh_every`` optimizer steps, right
after the step (step 3).

Packed documents: when the data module sets ``cross_document_attention: false`` or
``restart_positions: true``, every forward derives the document of each token from the EOS positions
of the batch and hands the model the document ids (block-diagonal causal attention) and/or positions
restarting at each document. A mixture's validation runs one loader per source: ``val/loss/<source>``
per source, and ``val/loss`` as their mean weighted by the mixture's shares.
"""

# Shape key: B sequences, S tokens, V vocabulary, L MoE layers, E experts.

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from sdmoe_train.checkpointing.manifest import checkpoint_problem
from sdmoe_train.checkpointing.model_state import model_state
from sdmoe_train.checkpointing.run_identity import IDENTITY_KEY, check_resume_compatibility, run_identity
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.optim import OptimConfig, build_optimizer
from sdmoe_train.models.compilation import compile_blocks
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.document_attention import document_ids, positions_in_documents
from sdmoe_train.models.meta_init import capture_rng_state, materialise, on_meta_device
from sdmoe_train.models.transformer import MoEAux, Transformer, TransformerOutput, language_model_loss
from sdmoe_train.moe.diagnostics import load_health
from sdmoe_train.moe.sdmoe import (
    SDMoEConfig,
    apply_spectral_decoupling,
    finish_optimizer_step,
    is_decoupled_state,
    project_gradients,
    refresh_count,
    register_gradient_projection_hooks,
    strict_update_reference,
)
from sdmoe_train.moe.ssmoe_router import (
    SSMoEConfig,
    apply_spectral_routing,
    refresh_spectral_routers,
    spectral_diagnostics,
    without_spectral_rows,
)
from sdmoe_train.parallel.config import ParallelConfig
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.lightning import (
    enable_expert_parallel,
    expert_param_groups,
    local_expert_state,
    uses_deepspeed,
)

# Checkpoints store the typed configs as hyper-parameters; allow them through torch.load(weights_only=True).
# MoEConfig moved from models/config.py to moe/config.py; checkpoints written before still name the old path.
torch.serialization.add_safe_globals(
    [TransformerConfig, AttentionConfig, MLAConfig, MoEConfig, OptimConfig, SDMoEConfig, SSMoEConfig, ParallelConfig]
    + [(MoEConfig, "sdmoe_train.models.config.MoEConfig")]
)


def _read_model_weights(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise ConfigError(f"model.init_from={path!r} is not a file; pass a .ckpt from `sdmoe-train import` or a run")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"model.init_from={path!r} is not a readable checkpoint: {problem}")
    try:
        # Memory-mapped: the tensors are read from the file only when they are loaded into the model.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(f"model.init_from={path!r} is not a readable checkpoint ({error})") from error
    weights = model_state(checkpoint) if isinstance(checkpoint, dict) else {}
    if not weights:
        raise ConfigError(f"model.init_from={path!r} has no `state_dict` with `model.` weights")
    return weights


def _load_model_weights(model: Transformer, weights: dict[str, Tensor], path: str) -> None:
    try:
        with warnings.catch_warnings():
            # Into a meta-device model this only checks names and shapes, which is what it is used for there.
            warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter", category=UserWarning)
            model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"model.init_from={path!r} does not fit model.arch (missing, unexpected or differently shaped "
            f"weights; use the model.yaml written next to it as model.arch): {error}"
        ) from error


class PretrainModule(L.LightningModule):
    """Next-token pretraining of an MoE (or dense) transformer.

    Its callbacks see it through :class:`~sdmoe_train.lightning.contract.MoETrainingModule`: ``model``,
    ``expert_groups``, ``last_routing`` and ``step_skipped``.

    Args:
        arch: the model architecture (see ``recipes/models/`` for presets).
        optim: AdamW and learning-rate schedule settings.
        sdmoe: SD-MoE spectral decoupling of the routed experts; None or ``enabled: false`` trains the
            vanilla MoE.
        init_from: a checkpoint whose model weights start this run: ``model.ckpt`` from ``sdmoe-train
            import`` or any ``.ckpt`` of an earlier run. Only weights are taken (fresh optimizer, schedule and
            data position); to resume an interrupted run use ``--ckpt_path`` instead.
        parallel: expert parallelism and activation checkpointing (``ep_size > 1`` needs the strategy
            :class:`sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy`; see docs/distributed.md).
        ssmoe: SSMoE spectral routing blended with the learned routers (training use is our extension;
            see docs/ssmoe.md); None or ``enabled: false`` keeps the learned routers.
    """

    def __init__(
        self,
        arch: TransformerConfig,
        optim: OptimConfig | None = None,
        sdmoe: SDMoEConfig | None = None,
        init_from: str | None = None,
        parallel: ParallelConfig | None = None,
        ssmoe: SSMoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.arch = arch
        self.optim = optim or OptimConfig()
        self.sdmoe = sdmoe or SDMoEConfig()
        self.parallel = parallel or ParallelConfig()
        self.parallel.check_num_experts(arch.moe.num_experts if arch.moe is not None else None)
        self.expert_groups: ExpertParallelGroups | None = None
        """The expert-parallel layout, set in :meth:`configure_model` when ``parallel.ep_size > 1``."""
        self._gradients_projected_in_backward = False
        self._blocks_compiled = False
        self.ssmoe = ssmoe or SSMoEConfig()
        if self.ssmoe.enabled and self.parallel.ep_size > 1:
            raise ConfigError(
                f"model.ssmoe.enabled=true with model.parallel.ep_size={self.parallel.ep_size} is not supported: "
                "the spectral router needs every expert's weights on each rank; train with ep_size=1, or train "
                "without SSMoE and evaluate the consolidated checkpoint with `sdmoe-train ssmoe-eval`"
            )
        if self.sdmoe.enabled and self.sdmoe.bases_from == "experts" and self.parallel.ep_size > 1:
            raise ConfigError(
                f"model.sdmoe.bases_from=experts with model.parallel.ep_size={self.parallel.ep_size} is not "
                "supported: the bases would need every expert on each rank; use bases_from=common or ep_size=1"
            )
        self._init_rng_state = capture_rng_state()
        # Shapes only: the weights get storage where they will live in `configure_model` (docs/performance.md).
        with torch.device("meta"):
            self.model = Transformer(arch)
            apply_spectral_decoupling(self.model, self.sdmoe)
            apply_spectral_routing(self.model, self.ssmoe)
        self._init_from = init_from
        self._initial_weights = None if init_from is None else _read_model_weights(init_from)
        checkpoint_decoupled = self._initial_weights is not None and is_decoupled_state(self._initial_weights)
        if self._initial_weights is not None and checkpoint_decoupled != self.sdmoe.enabled:
            raise ConfigError(
                f"model.init_from={init_from!r} holds {'SD-MoE' if checkpoint_decoupled else 'plain'} expert "
                f"weights but model.sdmoe.enabled={self.sdmoe.enabled}; SD-MoE initialises its common and unique "
                "parts itself (docs/design/sdmoe.md §3), so start SD-MoE from an SD-MoE checkpoint and a plain MoE "
                "from a plain one"
            )
        if self._initial_weights is not None:
            # Checks names and shapes now, against the meta model; the values are loaded in `configure_model`.
            _load_model_weights(self.model, without_spectral_rows(self._initial_weights), init_from)
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity()
        self.tokens_seen = 0
        self._load_since_step_LE: Tensor | None = None
        self.step_skipped = False
        """Set by :class:`~sdmoe_train.lightning.callbacks.NonFiniteGuard` when it drops this step's gradients."""
        self._val_load_LE: Tensor | None = None
        self.last_routing: MoEAux | None = None
        """Routing record of the latest training micro-batch, read by the routing-health monitor."""
        self._tokens_since_step = 0
        self._last_step_time = time.perf_counter()
        self._document_eos_id: int | None = None
        """EOS id marking document ends when documents are masked or positions restart (set in setup)."""
        self._mask_documents = False
        self._restart_positions = False
        self._validation_sources: list[str] | None = None
        self._source_shares: dict[str, float] = {}
        self.val_source_losses = torch.nn.ModuleDict()
        """Validation loss per mixture source (created in setup)."""

    def configure_model(self) -> None:
        """Shard the experts, give the weights storage, compile: once, before any use of the model.

        Lightning calls this once the processes are up, with the rank's device as the default device, before
        the strategy wraps the model and before a checkpoint is restored into it, so the shards below are what
        the optimizer and checkpoints see; ``load_from_checkpoint`` calls it outside any run (one process,
        all experts, CPU). Code that uses a module without either calls it itself.
        """
        if self.parallel.activation_checkpointing:
            self.model.activation_checkpointing = True
        if self._trainer is not None and self.parallel.ep_size > 1 and self.expert_groups is None:
            self.expert_groups = enable_expert_parallel(self.model, self.parallel, self.trainer)
        if on_meta_device(self.model):
            self._materialise()
        if self.parallel.compile and not self._blocks_compiled:
            compile_blocks(self.model)
            self._blocks_compiled = True
        if self._trainer is None:
            return
        if self.sdmoe.enabled and uses_deepspeed(self.trainer) and not self._gradients_projected_in_backward:
            for option in ("strict", "reproject_unique"):
                if getattr(self.sdmoe, option):
                    raise ConfigError(
                        f"model.sdmoe.{option}=true is not supported with the DeepSpeed strategy (ZeRO keeps its own "
                        "fp32 master weights, which edits of W_u after the optimizer step cannot reach); set "
                        f"sdmoe.{option}=false or use trainer.strategy=ddp"
                    )
            register_gradient_projection_hooks(self.model)
            self._gradients_projected_in_backward = True

    def cpu(self) -> PretrainModule:
        # Lightning's teardown moves the module to the CPU, also after an error that stopped the run before
        # `configure_model` (bad data, a vocabulary check): a meta-device model then has nothing to move, and
        # moving it would fail and hide that error.
        if on_meta_device(self.model):
            return self
        return super().cpu()

    def _materialise(self) -> None:
        # Inside Lightning's init context the default device is the strategy's root device (the rank's GPU).
        materialise(self.model, torch.get_default_device(), self._init_rng_state)
        if self._initial_weights is not None:
            # U is derived from weights; SSMoE rebuilds it from the loaded ones right below.
            weights = local_expert_state(without_spectral_rows(self._initial_weights), self.model, self.expert_groups)
            _load_model_weights(self.model, weights, self._init_from)
            self._initial_weights = None
        refresh_spectral_routers(self.model)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.arch.vocab_size:
            raise ConfigError(
                f"model.arch.vocab_size={self.arch.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({data_vocab}); set model.arch.vocab_size >= {data_vocab}"
            )
        self._mask_documents = not getattr(datamodule, "cross_document_attention", True)
        self._restart_positions = getattr(datamodule, "restart_positions", False)
        if self._mask_documents or self._restart_positions:
            self._document_eos_id = datamodule.eos_token_id
        self._validation_sources = getattr(datamodule, "validation_sources", None)
        if self._validation_sources:
            weights = datamodule.mixture_weights
            total = sum(weights[name] for name in self._validation_sources)
            self._source_shares = {name: weights[name] / total for name in self._validation_sources}
            self.val_source_losses = torch.nn.ModuleDict({name: MeanMetric() for name in self._validation_sources})

    def forward(self, tokens_BS: Tensor) -> Tensor:
        return self._model_outputs(tokens_BS).logits

    def _model_outputs(self, inputs_BS: Tensor) -> TransformerOutput:
        if self._document_eos_id is None:
            return self.model(inputs_BS)
        ids_BS = document_ids(inputs_BS, self._document_eos_id)
        return self.model(
            inputs_BS,
            document_ids_BS=ids_BS if self._mask_documents else None,
            positions_BS=positions_in_documents(ids_BS) if self._restart_positions else None,
        )

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        inputs_BS, targets_BS = batch[:, :-1], batch[:, 1:]
        out = self._model_outputs(inputs_BS)
        lm_loss = language_model_loss(out.logits, targets_BS)
        loss = lm_loss
        if out.moe is not None:
            loss = loss + out.moe.loss
            self._record_routing(out.moe)
        self._tokens_since_step += targets_BS.numel()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lm_loss", lm_loss)
        return loss

    def _record_routing(self, moe: MoEAux) -> None:
        self.last_routing = moe
        load_LE = moe.tokens_per_expert_LE.detach()
        # A copy: the step's all-reduce of these counts works in place and must not alter `last_routing`.
        self._load_since_step_LE = (
            load_LE.clone() if self._load_since_step_LE is None else self._load_since_step_LE + load_LE
        )
        self.log("train/moe_aux_loss", moe.loss)
        per_layer = {
            "load_balance_loss": moe.load_balance_loss_L,
            "seq_balance_loss": moe.sequence_balance_loss_L,
            "z_loss": moe.z_loss_L,
        }
        if self.arch.moe is not None and self.arch.moe.capacity_factor is not None:
            per_layer["dropped_fraction"] = moe.dropped_fraction_L
        metrics = {
            f"moe/{name}/layer_{layer:02d}": values_L[i]
            for name, values_L in per_layer.items()
            for i, layer in enumerate(moe.layer_indices)
        }
        self.log_dict(metrics)
        if self.ssmoe.enabled:
            self.log_dict(spectral_diagnostics(self.model, load_LE))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning 2.6.6 (`Precision._after_closure`) calls this after the closure has run the last
        # micro-batch's backward, i.e. after accumulation and after DDP's all-reduce, and right before
        # `_clip_gradients` and the parameter update: where docs/design/sdmoe.md §4 puts the gradient split. Callbacks'
        # `on_before_optimizer_step` run just before this hook and still see the unprojected gradients.
        if self.sdmoe.enabled and not self._gradients_projected_in_backward:
            project_gradients(self.model)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # W_u is not touched between here and the step (the closure only runs forward/backward).
        update_reference = strict_update_reference(self.model) if self.sdmoe.enabled else None
        super().optimizer_step(*args, **kwargs)
        if self.step_skipped:
            # NonFiniteGuard dropped every gradient: the step changed nothing, so neither do the biases.
            self.step_skipped = False
            self._load_since_step_LE = None
            self._log_throughput()
            return
        if self._load_since_step_LE is not None:
            global_load_LE = self.trainer.strategy.reduce(self._load_since_step_LE, reduce_op="sum")
            self.model.update_routing_biases(global_load_LE)
            self._load_since_step_LE = None
        if self.sdmoe.enabled:
            finish_optimizer_step(self.model, update_reference)
            self.log("sdmoe/refresh_count", float(refresh_count(self.model)))
        # Inside this hook `global_step` does not count the step that just finished yet.
        refresh_every = self.ssmoe.refresh_every
        if self.ssmoe.enabled and refresh_every and (self.trainer.global_step + 1) % refresh_every == 0:
            refresh_spectral_routers(self.model)
        self._log_throughput()

    def _run_identity(self) -> dict[str, Any]:
        return run_identity(self.arch, self.sdmoe, getattr(self._trainer, "datamodule", None))

    def _log_throughput(self) -> None:
        tokens = self._tokens_since_step * self.trainer.world_size
        self._tokens_since_step = 0
        self.tokens_seen += tokens
        now = time.perf_counter()
        self.log("train/tokens_seen", float(self.tokens_seen))
        self.log("train/tokens_per_sec", tokens / max(now - self._last_step_time, 1e-9), prog_bar=True)
        self._last_step_time = now
        mixture_metrics = getattr(getattr(self.trainer, "datamodule", None), "mixture_metrics", None)
        if mixture_metrics is not None:
            # Computed from the mixture position, which is global and the same on every rank.
            self.log_dict(mixture_metrics())

    def on_fit_start(self) -> None:
        # A `trainer.validate` before `fit` leaves the metric states as inference-mode tensors, which
        # validation inside fit (run under no_grad on some backends) may not update in place.
        self.val_loss.reset()
        self.val_perplexity.reset()

    def on_train_start(self) -> None:
        self._last_step_time = time.perf_counter()

    def validation_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs_BS, targets_BS = batch[:, :-1], batch[:, 1:]
        out = self._model_outputs(inputs_BS)
        logits_BSV = out.logits.float()
        if out.moe is not None:
            load_LE = out.moe.tokens_per_expert_LE
            self._val_load_LE = load_LE if self._val_load_LE is None else self._val_load_LE + load_LE
        loss = language_model_loss(logits_BSV, targets_BS)
        if self._validation_sources:
            self.val_source_losses[self._validation_sources[dataloader_idx]].update(loss, weight=targets_BS.numel())
            return
        self.val_loss.update(loss, weight=targets_BS.numel())
        self.val_perplexity.update(logits_BSV, targets_BS)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity)

    def on_validation_epoch_end(self) -> None:
        """Per-source losses of a mixture, and routing health of the whole validation set per MoE layer:
        ``val/<quantity>/layer_NN``."""
        if self._validation_sources:
            self._log_source_losses()
        if self._val_load_LE is None:
            return
        load_LE = self.trainer.strategy.reduce(self._val_load_LE, reduce_op="sum")
        self._val_load_LE = None
        health = load_health(load_LE).named()
        for row, (index, _) in enumerate(self.model.moe_layers()):
            for name in ("load_entropy", "dead_expert_fraction", "load_cv"):
                self.log(f"val/{name}/layer_{index:02d}", health[name][row])

    def _log_source_losses(self) -> None:
        # Every rank validates the same number of batches per source, so all take the same branches
        # (compute() synchronises across ranks).
        losses = {}
        for name, metric in self.val_source_losses.items():
            if metric.update_count > 0:
                losses[name] = metric.compute()
                self.log(f"val/loss/{name}", losses[name])
            metric.reset()
        if losses:
            shares = torch.tensor([self._source_shares[name] for name in losses])
            overall = (torch.stack(list(losses.values())).cpu() * shares).sum() / shares.sum()
            self.log("val/loss", overall, prog_bar=True)
            self.log("val/perplexity", overall.exp())

    def configure_optimizers(self) -> dict[str, Any]:
        # A tied output head is the embedding tensor itself, so it follows the embedding's policy.
        regroup = None if self.expert_groups is None else expert_param_groups(self.expert_groups)
        optimizer, scheduler = build_optimizer(
            self.model, self.optim, {self.model.embed.weight}, int(self.trainer.estimated_stepping_batches), regroup
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sdmoe_train"] = {"tokens_seen": self.tokens_seen, IDENTITY_KEY: self._run_identity()}
        if self.ssmoe.enabled:
            checkpoint["sdmoe_train"]["ssmoe_rows"] = list(self.ssmoe.rows_settings())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before any tensor is loaded (Lightning calls this hook first), so a changed recipe is reported
        # as a list of differences instead of a shape error.
        if self._trainer is not None:
            check_resume_compatibility(checkpoint, self._run_identity(), self._trainer.ckpt_path)
        self.tokens_seen = checkpoint.get("sdmoe_train", {}).get("tokens_seen", 0)
        # Not the `ssmoe` hyper-parameter: `load_from_checkpoint(..., ssmoe=...)` overwrites that one.
        saved_rows = checkpoint.get("sdmoe_train", {}).get("ssmoe_rows")
        same_rows = saved_rows is not None and list(saved_rows) == list(self.ssmoe.rows_settings())
        if not (self.ssmoe.enabled and same_rows) and "state_dict" in checkpoint:
            # A saved U is reused only when it was built the same way (exact resume); otherwise it is dropped
            # before the weights load, and the spectral routers rebuild it from the loaded weights.
            checkpoint["state_dict"] = without_spectral_rows(checkpoint["state_dict"])
