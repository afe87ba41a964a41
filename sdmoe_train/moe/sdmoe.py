"""SD-MoE: spectral decoupling of routed-expert weights (arXiv 2602.12556; docs/design/sdmoe.md).

Every decomposed matrix type of a layer's routed experts becomes one common part ``W_c`` shared by all E
experts plus E unique parts ``W_u[i]`` kept in the orthogonal complement of the top-k singular subspaces
(``U_k``, ``V_k``) of ``W_c``; the expert applied to a token is the proxy ``W_c + W_u[i]``
(docs/design/sdmoe.md §2). This file owns the configuration, the expert bank and the per-step protocol;
the matrix algebra lives in :mod:`sdmoe_train.moe.spectral`. The training loop calls, once per optimizer
step::

    project_gradients(model)                  # after accumulation + DP all-reduce, before clipping (§4)
    reference = strict_update_reference(model) # before the step; None unless strict
    optimizer.step()
    finish_optimizer_step(model, reference)    # strict update projection, step count, refresh (§4, §5)

and :func:`merge_spectral_decoupling` turns the model back into a plain MoE for inference and export (§6).

The split runs once per optimizer step on the accumulated gradients, not inside the expert GEMMs'
backward: projecting there would cost work in proportion to every micro-batch's tokens (the per-step
split does not grow with the batch) and, under bf16 autocast, could only stay in fp32 by running the
weight GEMM in fp32 (docs/design/sdmoe.md; measurements in benchmarks/README.md).
"""

# Shape key: E experts, M matrix rows (out), N matrix columns (in), K common rank, D model width,
# F expert width.

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.moe.experts import MATRIX_TYPES, ExpertBank, MatrixType
from sdmoe_train.moe.layer import MoELayer, MoEModel
from sdmoe_train.moe.spectral import (
    UpdateReference,
    fold_touching_parts_,
    project_common_gradient_,
    project_unique_gradient_,
    project_unique_update_,
    spectral_init,
    top_singular_bases,
    update_reference,
)


@dataclass(kw_only=True)
class SDMoEConfig:
    """Spectral decoupling of the routed experts (SD-MoE); ``enabled: false`` is exactly the vanilla MoE."""

    enabled: bool = False
    """Decompose the routed experts into common + unique parts; false leaves the model untouched."""
    rank: int = 8
    """k: rank of the common subspace; must be below min(out, in) of every decomposed expert matrix."""
    refresh_every: int = 16
    """Optimizer steps between recomputations of the bases U_k, V_k from the current W_c."""
    matrices: list[MatrixType] = field(default_factory=lambda: list(MATRIX_TYPES))
    """Expert matrix types to decompose; the others stay plain per-expert banks."""
    strict: bool = False
    """Also project the optimizer's update of W_u onto the complement (AdamW can leave it otherwise)."""
    reproject_unique: bool = False
    """At each refresh, move what W_u touches of the new bases out of it (experts' mean into W_c); not in the paper."""
    bases_from: Literal["common", "experts"] = "common"
    """Refresh U_k, V_k from W_c (the paper) or from the subspaces all E proxies use most (not in the paper)."""
    svd: Literal["full", "lowrank"] = "full"
    """Basis refresh by full torch.linalg.svd, or a seeded randomised SVD (much cheaper; benchmarks/README.md)."""
    seed: int = 0
    """Seed of the spectral initialisation and of the randomised-SVD sketches."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"sdmoe.rank={self.rank} must be >= 1")
        if self.refresh_every < 1:
            raise ConfigError(f"sdmoe.refresh_every={self.refresh_every} must be >= 1")
        if not self.matrices or len(set(self.matrices)) != len(self.matrices):
            raise ConfigError(
                f"sdmoe.matrices={list(self.matrices)} must name each of {list(MATRIX_TYPES)} at most once, "
                "and at least one"
            )
        unknown = [matrix for matrix in self.matrices if matrix not in MATRIX_TYPES]
        if unknown:
            raise ConfigError(f"sdmoe.matrices={list(self.matrices)} contains {unknown}; valid: {list(MATRIX_TYPES)}")
        if self.bases_from not in ("common", "experts"):
            raise ConfigError(f"sdmoe.bases_from={self.bases_from!r} must be 'common' or 'experts'")
        if self.svd not in ("full", "lowrank"):
            raise ConfigError(f"sdmoe.svd={self.svd!r} must be 'full' or 'lowrank'")


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps), identical in every process and on resume."""
    state = 0
    for part in parts:
        state = (state ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class DecoupledExpertBank(ExpertBank):
    """Routed experts whose decomposed matrices are ``W_c + W_u[i]`` (§2), same dispatch path as the base.

    For each decomposed type t (``gate``/``up``/``down``) it holds the parameters ``{t}_proj_common``
    (M, N) and ``{t}_proj_unique`` (E, M, N) and the persistent buffers ``{t}_proj_left_basis`` (M, k) and
    ``{t}_proj_right_basis`` (N, k); a type that is not decomposed keeps its plain ``{t}_proj`` bank. The
    buffer ``optimizer_steps`` counts steps since decoupling, so a checkpoint fixes when the next refresh
    happens, and the randomised-SVD sketch is seeded from (seed, layer, type, refresh index), so it needs no
    saved generator state.

    The proxies are built by a broadcast add ``W_c + W_u`` every forward and are ordinary temporaries:
    computing ``x @ W_cᵀ`` once over all routed rows plus a grouped GEMM on W_u costs 2·rows·M·N FLOPs per
    matrix and loses whenever routed rows outnumber experts, and keeping the proxies in persistent buffers
    would hold a second copy of every routed expert (fp32; tens of GB at the paper's 7B scale) for no gain
    under CUDA's caching allocator (on CPU see the allocator tip in the README). Autograd hands W_u the
    proxy's gradient buffer itself, so no copy is made. Measurements: ``benchmarks/README.md``.
    """

    def __init__(self, base: ExpertBank, config: SDMoEConfig, init_stds: dict[MatrixType, float], layer_index: int):
        """Decouple ``base`` with a fresh spectral initialisation (§3).

        On the meta device only the shapes are created; :meth:`reset_parameters` initialises them once they
        have storage.

        Args:
            base: the plain bank; banks of types that are not decomposed are taken over unchanged.
            config: SD-MoE settings (``config.rank`` already checked against the matrix shapes).
            init_stds: std of the ordinary init W0 of each matrix type.
            layer_index: block index, mixed into the seeds so that layers differ.
        """
        # ExpertBank.__init__ would allocate the stacked banks this class replaces.
        nn.Module.__init__(self)
        self.num_experts = base.num_experts
        self.total_experts = base.total_experts
        self.expert_offset = base.expert_offset
        self.config = config
        self.init_stds = dict(init_stds)
        self.layer_index = layer_index
        self.decomposed: tuple[MatrixType, ...] = tuple(t for t in MATRIX_TYPES if t in config.matrices)
        device = base.gate_proj.device
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.int64, device=device))
        self._steps_mirror: int | None = None
        self.register_load_state_dict_post_hook(self._forget_steps_mirror)
        for matrix in MATRIX_TYPES:
            bank_EMN = getattr(base, f"{matrix}_proj")
            if matrix not in self.decomposed:
                setattr(self, f"{matrix}_proj", bank_EMN)
                continue
            rows, columns = bank_EMN.shape[1:]
            empty = {"device": device, "dtype": bank_EMN.dtype}
            setattr(self, f"{matrix}_proj_common", nn.Parameter(torch.empty(rows, columns, **empty)))
            setattr(self, f"{matrix}_proj_unique", nn.Parameter(torch.empty(bank_EMN.shape, **empty)))
            bases = {"device": device, "dtype": torch.float32}
            self.register_buffer(f"{matrix}_proj_left_basis", torch.empty(rows, config.rank, **bases))
            self.register_buffer(f"{matrix}_proj_right_basis", torch.empty(columns, config.rank, **bases))
        if device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spectral initialisation (docs/design/sdmoe.md §3) of every decomposed type and a zero step count.

        W0 is drawn from a generator seeded by (seed, layer, type) and split on the CPU whatever the bank's
        device, for all of the layer's experts, so a bank built on a GPU or holding an expert-parallel
        slice gets exactly the values of the same experts of a bank built whole on the CPU.
        """
        self.optimizer_steps.zero_()
        self._steps_mirror = None
        held = slice(self.expert_offset, self.expert_offset + self.num_experts)
        for matrix in self.decomposed:
            common_MN, unique_EMN, left_MK, right_NK = self.parts(matrix)
            generator = torch.Generator().manual_seed(
                _derived_seed(self.config.seed, self.layer_index, MATRIX_TYPES.index(matrix))
            )
            weight_MN = torch.empty(common_MN.shape, dtype=torch.float32, device="cpu")
            weight_MN.normal_(std=self.init_stds[matrix], generator=generator)
            init = spectral_init(weight_MN, self.config.rank, self.total_experts, generator)
            common_MN.copy_(init.common_MN)
            unique_EMN.copy_(init.unique_EMN[held])
            left_MK.copy_(init.left_basis_MK)
            right_NK.copy_(init.right_basis_NK)

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The (gate, up, down) proxies ``W_c + W_u[i]``; a plain bank for types that are not decomposed."""
        gate_EFD, up_EFD, down_EDF = (self.proxy(matrix) for matrix in MATRIX_TYPES)
        return gate_EFD, up_EFD, down_EDF

    def proxy(self, matrix: MatrixType) -> Tensor:
        """The (E, M, N) weights applied for one matrix type."""
        if matrix not in self.decomposed:
            return getattr(self, f"{matrix}_proj")
        return getattr(self, f"{matrix}_proj_common") + getattr(self, f"{matrix}_proj_unique")

    def applied_weight(self, matrix: MatrixType) -> Tensor:
        """The proxies ``W_c + W_u[i]`` (E, M, N); the plain bank for a type that is not decomposed."""
        return self.proxy(matrix)

    def applied_weight_grad(self, matrix: MatrixType) -> Tensor | None:
        """Gradient of the proxies: W_u's gradient, which autograd makes equal to it (before the §4 split)."""
        if matrix in self.decomposed:
            return getattr(self, f"{matrix}_proj_unique").grad
        return getattr(self, f"{matrix}_proj").grad

    def unique_part(self, matrix: MatrixType) -> Tensor | None:
        """W_u (E, M, N) of a decomposed matrix type; None for a type kept as a plain bank."""
        return getattr(self, f"{matrix}_proj_unique") if matrix in self.decomposed else None

    def common_bases(self, matrix: MatrixType) -> tuple[Tensor, Tensor] | None:
        """(U_k (M, k), V_k (N, k)) of a decomposed matrix type; None for a type kept as a plain bank."""
        if matrix not in self.decomposed:
            return None
        return getattr(self, f"{matrix}_proj_left_basis"), getattr(self, f"{matrix}_proj_right_basis")

    def parts(self, matrix: MatrixType) -> tuple[nn.Parameter, nn.Parameter, Tensor, Tensor]:
        """(W_c (M, N), W_u (E, M, N), U_k (M, k), V_k (N, k)) of a decomposed matrix type."""
        prefix = f"{matrix}_proj"
        return (
            getattr(self, f"{prefix}_common"),
            getattr(self, f"{prefix}_unique"),
            getattr(self, f"{prefix}_left_basis"),
            getattr(self, f"{prefix}_right_basis"),
        )

    @property
    def steps(self) -> int:
        """Optimizer steps since decoupling; a host-side mirror of the buffer, read from the device once."""
        if self._steps_mirror is None:
            self._steps_mirror = int(self.optimizer_steps)
        return self._steps_mirror

    def count_step(self) -> bool:
        """Count one optimizer step; refresh the bases when it completes a refresh interval (§5).

        Returns:
            Whether the bases were refreshed.
        """
        steps = self.steps + 1
        self.optimizer_steps.add_(1)
        self._steps_mirror = steps
        if steps % self.config.refresh_every:
            return False
        self.refresh_bases()
        return True

    @torch.no_grad()
    def refresh_bases(self) -> None:
        """Recompute U_k, V_k as the top-k singular vectors of the current W_c (§5).

        W_c and W_u stay as they are (the paper's rule), unless ``reproject_unique`` is set: then every W_u[i]
        is projected onto the new bases' complement and the mean of the removed parts is added to W_c
        (:func:`~sdmoe_train.moe.spectral.fold_touching_parts_`), so the experts' mean proxy is unchanged.
        With ``bases_from: experts`` the bases are the top-k left singular vectors of the proxies side by side
        ``[W_1 … W_E]`` and the top-k right singular vectors of the proxies stacked ``[W_1; …; W_E]``, i.e. the
        top eigenvectors of ``Σ_i W_i W_iᵀ`` and ``Σ_i W_iᵀ W_i``: the output and input directions the experts
        use most, whether W_c or the unique parts carry them (the paper's "shared dominant directions").
        """
        refresh_index = self.steps // self.config.refresh_every
        for matrix in self.decomposed:
            common_MN, unique_EMN, left_MK, right_NK = self.parts(matrix)
            generator = None
            if self.config.svd == "lowrank":
                generator = torch.Generator(common_MN.device).manual_seed(
                    _derived_seed(self.config.seed, self.layer_index, MATRIX_TYPES.index(matrix), refresh_index)
                )
            new_left_MK, new_right_NK = self._bases_source(common_MN, unique_EMN, generator)
            left_MK.copy_(new_left_MK)
            right_NK.copy_(new_right_NK)
            if self.config.reproject_unique:
                fold_touching_parts_(common_MN, unique_EMN, left_MK, right_NK)

    def _bases_source(
        self, common_MN: Tensor, unique_EMN: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        rank, method = self.config.rank, self.config.svd
        if self.config.bases_from == "common":
            return top_singular_bases(common_MN, rank, method, generator)
        proxies_EMN = common_MN + unique_EMN
        # Left bases of the side-by-side (M, E·N) proxies, right bases of the stacked (E·M, N) ones.
        left_MK, _ = top_singular_bases(proxies_EMN.transpose(0, 1).flatten(1), rank, method, generator)
        _, right_NK = top_singular_bases(proxies_EMN.flatten(0, 1), rank, method, generator)
        return left_MK, right_NK

    @torch.no_grad()
    def merged(self) -> ExpertBank:
        """A plain :class:`ExpertBank` whose banks are the proxies ``W_c + W_u[i]`` (§6)."""
        gate_EFD, up_EFD, down_EDF = (proxy.detach().clone() for proxy in self.expert_weights())
        with torch.device("meta"):
            bank = ExpertBank(self.num_experts, hidden_dim=gate_EFD.shape[2], expert_hidden_dim=gate_EFD.shape[1])
        bank.gate_proj, bank.up_proj, bank.down_proj = (nn.Parameter(w) for w in (gate_EFD, up_EFD, down_EDF))
        return bank

    def _forget_steps_mirror(self, module: nn.Module, incompatible_keys: Any) -> None:
        # Loading a checkpoint replaces the buffer; the mirror is re-read from it on next use.
        self._steps_mirror = None


def is_decoupled_state(state: Mapping[str, Any]) -> bool:
    """Whether a model ``state_dict`` holds SD-MoE banks (their ``{t}_proj_common`` parameters)."""
    return any(key.endswith("_proj_common") for key in state)


def decoupled_banks(model: nn.Module) -> list[DecoupledExpertBank]:
    """Every SD-MoE expert bank of a model, in module order."""
    return [module for module in model.modules() if isinstance(module, DecoupledExpertBank)]


def apply_spectral_decoupling(model: MoEModel, config: SDMoEConfig) -> None:
    """Replace every MoE layer's routed bank by a freshly initialised :class:`DecoupledExpertBank`.

    W0 is drawn with the model's init scheme: std ``init_std`` for gate/up and the residual std
    ``init_std / sqrt(2·n_layers)`` for down (see :mod:`sdmoe_train.models.transformer`). Nothing is done
    when ``config.enabled`` is false.

    Args:
        model: a materialised (not meta) MoE model (a :class:`~sdmoe_train.models.transformer.Transformer`).
        config: SD-MoE settings.

    Raises:
        ConfigError: the model has no MoE layer, or ``config.rank`` is not below min(out, in) of a
            decomposed matrix.
    """
    if not config.enabled:
        return
    layers = list(model.moe_layers())
    if any(isinstance(layer.experts, DecoupledExpertBank) for _, layer in layers):
        raise ValueError("the model is already spectrally decoupled")
    if not layers:
        raise ConfigError("sdmoe.enabled=true needs an MoE model, but arch.moe is null (every layer is dense)")
    std = model.config.init_std
    init_stds: dict[MatrixType, float] = {
        "gate": std,
        "up": std,
        "down": std / math.sqrt(2 * model.config.n_layers),
    }
    for _, layer in layers:
        _check_rank(layer.experts, config)
    for index, layer in layers:
        layer.experts = DecoupledExpertBank(layer.experts, config, init_stds, index)


def _check_rank(bank: ExpertBank, config: SDMoEConfig) -> None:
    for matrix in config.matrices:
        rows, columns = getattr(bank, f"{matrix}_proj").shape[1:]
        if config.rank >= min(rows, columns):
            raise ConfigError(
                f"sdmoe.rank={config.rank} must be smaller than both dimensions of every decomposed expert "
                f"matrix, but {matrix} is {rows}x{columns}; use sdmoe.rank <= {min(rows, columns) - 1} "
                "(the paper uses 2-32)"
            )


@torch.no_grad()
def project_gradients(model: nn.Module) -> None:
    """Split the gradients of every decomposed matrix into common and unique parts (§4), in place.

    Call after gradient accumulation and the data-parallel all-reduce, before clipping and the optimizer
    step. The projection is linear, so projecting the reduced gradient equals reducing projected ones.
    Parameters without a gradient are skipped.
    """
    for bank in decoupled_banks(model):
        for matrix in bank.decomposed:
            common_MN, unique_EMN, left_MK, right_NK = bank.parts(matrix)
            if unique_EMN.grad is not None:
                project_unique_gradient_(unique_EMN.grad, left_MK, right_NK)
            if common_MN.grad is not None:
                project_common_gradient_(common_MN.grad, left_MK, right_NK)


def register_gradient_projection_hooks(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Project every gradient contribution of W_c and W_u as autograd produces it (§4), per micro-batch.

    For strategies that reduce and partition gradients inside backward (DeepSpeed ZeRO-2 frees ``.grad``), so
    that :func:`project_gradients` after accumulation has nothing to work on. The projections are linear and
    every rank holds the same bases, so projecting each rank's micro-batch gradient before the reduction
    equals projecting the reduced, accumulated gradient once.

    Returns:
        The hook handles (remove them to go back to :func:`project_gradients`).
    """
    handles = []
    for bank in decoupled_banks(model):
        for matrix in bank.decomposed:
            common_MN, unique_EMN, _, _ = bank.parts(matrix)
            handles.append(common_MN.register_hook(_projection_hook(bank, matrix, project_common_gradient_)))
            handles.append(unique_EMN.register_hook(_projection_hook(bank, matrix, project_unique_gradient_)))
    return handles


def _projection_hook(bank: DecoupledExpertBank, matrix: MatrixType, project_: Any) -> Any:
    # The bases are looked up at backward time: a refresh replaces their values between steps.
    @torch.no_grad()
    def hook(grad: Tensor) -> Tensor:
        _, _, left_MK, right_NK = bank.parts(matrix)
        projected = grad.clone()
        project_(projected, left_MK, right_NK)
        return projected

    return hook


def strict_update_reference(model: nn.Module) -> dict[tuple[int, str], UpdateReference] | None:
    """Before the optimizer step: what strict mode needs to project W_u's update; None when not strict.

    Holds ``E·k·(M + N)`` fp32 values per decomposed matrix until :func:`finish_optimizer_step` (not a
    copy of W_u, see :class:`~sdmoe_train.moe.spectral.UpdateReference`).
    """
    banks = [bank for bank in decoupled_banks(model) if bank.config.strict]
    if not banks:
        return None
    return {
        (id(bank), matrix): update_reference(*bank.parts(matrix)[1:]) for bank in banks for matrix in bank.decomposed
    }


@torch.no_grad()
def finish_optimizer_step(model: nn.Module, reference: dict[tuple[int, str], UpdateReference] | None) -> bool:
    """After the optimizer step: strict update projection, then step counting and periodic basis refresh.

    Args:
        model: the SD-MoE model.
        reference: :func:`strict_update_reference` taken before the step.

    Returns:
        Whether the bases were refreshed at this step.
    """
    refreshed = False
    for bank in decoupled_banks(model):
        if reference is not None:
            for matrix in bank.decomposed:
                _, unique_EMN, left_MK, right_NK = bank.parts(matrix)
                project_unique_update_(unique_EMN, reference[id(bank), matrix], left_MK, right_NK)
        refreshed = bank.count_step() or refreshed
    return refreshed


def refresh_bases(model: nn.Module) -> None:
    """Recompute every bank's bases from its current W_c now (§5), regardless of the step count."""
    for bank in decoupled_banks(model):
        bank.refresh_bases()


def refresh_count(model: nn.Module) -> int:
    """Basis refreshes done so far (0 for a vanilla model); host-side, no device sync after the first call."""
    banks = decoupled_banks(model)
    return banks[0].steps // banks[0].config.refresh_every if banks else 0


@torch.no_grad()
def merge_spectral_decoupling(model: nn.Module) -> None:
    """Replace every SD-MoE bank by a plain :class:`ExpertBank` holding ``W_c + W_u[i]`` (§6).

    The merged model has the vanilla parameter names and count and computes the same function.
    """
    for layer in model.modules():
        if isinstance(layer, MoELayer) and isinstance(layer.experts, DecoupledExpertBank):
            layer.experts = layer.experts.merged()
