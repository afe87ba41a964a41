"""Models built on the meta device and materialised later, with exactly the weights of eager construction.

A paper-scale preset does not fit in host memory in fp32 (``qwen_moe_7b_a1_5b`` is 7.1 B parameters,
~27 GB), so :class:`~sdmoe_train.lightning.module.PretrainModule` builds its :class:`Transformer` under
``torch.device("meta")`` (shapes, no storage) and calls :func:`materialise` from ``configure_model``, where
Lightning has made the rank's accelerator the default device and expert parallelism has already cut each
routed bank down to the rank's slice. No more than one parameter of the full model is ever held in host
memory on the way.

Same weights as ``Transformer(config)`` built eagerly on the CPU from the same global RNG state: eager
construction draws from torch's global CPU generator twice, first as each ``torch.nn`` layer initialises
itself while it is built, then as :meth:`Transformer.reset_parameters` overwrites every parameter in
``named_parameters`` order (:func:`~sdmoe_train.models.transformer.init_parameter_`). :func:`materialise`
replays both rounds with its own CPU generator started from the state captured when the meta model was built
(:func:`capture_rng_state`), one layer or parameter at a time, and copies each parameter to its device, or only
the rank's experts of it. Parameters the model no longer has (SD-MoE replaced the plain expert banks) are
drawn and dropped, so every later one still matches. Buffers start at zero, as all buffers of these modules
are constructed; SD-MoE banks then run their own seeded spectral init. SSMoE's U is derived from the final
weights, so the caller recomputes it after loading any ``init_from`` weights. Torch's global generator is
neither read nor advanced by :func:`materialise`, and the values do not depend on the target device.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from sdmoe_train.models.transformer import Transformer, init_parameter_
from sdmoe_train.moe.experts import ExpertBank
from sdmoe_train.moe.sdmoe import DecoupledExpertBank


def capture_rng_state() -> Tensor:
    """The global CPU RNG state that eager construction would start drawing from now."""
    return torch.get_rng_state()


def on_meta_device(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` still lacks storage."""
    return any(tensor.is_meta for tensor in itertools.chain(model.parameters(), model.buffers()))


@torch.no_grad()
def materialise(model: Transformer, device: torch.device | str, rng_state: Tensor) -> None:
    """Give every meta tensor of ``model`` storage on ``device`` and the values eager construction gives it.

    Args:
        model: a transformer built on the meta device, possibly spectrally decoupled (SD-MoE), with SSMoE
            routers, and with expert banks already cut to an expert-parallel rank's slice.
        device: where the weights will live.
        rng_state: :func:`capture_rng_state` taken right before the model was built.
    """
    _allocate(model, torch.device(device))
    generator = torch.Generator()
    generator.set_state(rng_state)
    drawn = _draw_plain_parameters(model, generator)
    banks = [module for module in model.modules() if isinstance(module, DecoupledExpertBank)]
    for bank in banks:
        bank.reset_parameters()
    spectral = {id(param) for bank in banks for param in bank.parameters(recurse=False)}
    missed = [name for name, param in model.named_parameters() if id(param) not in drawn | spectral]
    assert not missed, f"materialise has no init rule for {missed}"


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Replace every meta parameter (keeping its attributes, e.g. expert marks) and buffer by storage on device.

    Shared tensors (tied embeddings) stay shared; buffers are zero-filled, parameters left uninitialised.
    """
    replaced: dict[int, Tensor] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if not param.is_meta:
                continue
            if id(param) not in replaced:
                fresh = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), param.requires_grad)
                fresh.__dict__.update(param.__dict__)
                replaced[id(param)] = fresh
            setattr(module, name, replaced[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            if buffer.is_meta:
                replaced.setdefault(id(buffer), torch.zeros(buffer.shape, dtype=buffer.dtype, device=device))
                setattr(module, name, replaced[id(buffer)])


def _draw_plain_parameters(model: Transformer, generator: torch.Generator) -> set[int]:
    """Replay eager construction's draws; copy each parameter ``model`` holds. Returns the ids of those.

    Eager construction draws twice: each ``torch.nn`` layer initialises itself while it is built
    (``nn.Linear``'s Kaiming-uniform, ``nn.Embedding``'s N(0, 1)), in construction order, and then
    :meth:`Transformer.reset_parameters` overwrites every parameter. The first round only advances the
    generator; it is replayed on a CPU copy of one layer at a time.
    """
    # Eager construction drew in the default dtype of its time, which is the dtype the meta model got.
    with torch.device("meta"), _default_dtype(model.embed.weight.dtype):
        plain = Transformer(model.config)
    for layer in plain.modules():
        if type(layer).__module__.startswith("torch.nn") and hasattr(layer, "reset_parameters"):
            _replay_default_init(layer, generator)
    held = dict(model.named_parameters())
    drawn: set[int] = set()
    for name, template in plain.named_parameters():
        target = held.get(name)
        in_place = target is not None and target.device.type == "cpu"
        if in_place and (target.shape, target.dtype) == (template.shape, template.dtype):
            init_parameter_(target, name, model.config, generator)  # straight into place: no second copy
            drawn.add(id(target))
            continue
        # On the CPU explicitly: Lightning calls configure_model with the accelerator as the default device.
        values = torch.empty(template.shape, dtype=template.dtype, device="cpu")
        init_parameter_(values, name, model.config, generator)
        if target is None:
            continue  # replaced (SD-MoE banks); drawn anyway so that later parameters match
        target.copy_(_held_part(model, name, values, target))
        drawn.add(id(target))
    return drawn


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Lightning's init context of `64-true` (or `bf16-true`) changes the default dtype around configure_model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _replay_default_init(layer: nn.Module, generator: torch.Generator) -> None:
    """Run ``layer.reset_parameters()`` on a throwaway CPU copy, drawing from ``generator``."""
    if not any(True for _ in layer.parameters(recurse=False)):
        return
    scratch = copy.deepcopy(layer).to_empty(device="cpu")
    global_state = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        scratch.reset_parameters()
        generator.set_state(torch.get_rng_state())
    finally:
        torch.set_rng_state(global_state)


def _held_part(model: nn.Module, name: str, values: Tensor, target: Tensor) -> Tensor:
    """``values``, or the slice of its experts that an expert-parallel bank holds."""
    if values.shape == target.shape:
        return values
    owner = model.get_submodule(name.rpartition(".")[0])
    assert isinstance(owner, ExpertBank), f"{name}: shape {tuple(target.shape)} is not {tuple(values.shape)}"
    return values[owner.expert_offset : owner.expert_offset + owner.num_experts]
