"""The SD-MoE evidence study's settings, arms and training recipes.

Every setting a training run depends on is written out here, including the ones that equal today's library
defaults (tokenizer, sequence length, validation split, optimizer, architecture), so that a later change of a
default elsewhere in the project does not silently change the study. :func:`run_recipe` turns one (arm, seed)
into a complete ``sdmoe-train fit`` recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PAPER_SDMOE: dict[str, Any] = {
    "enabled": True,
    "rank": 8,
    "refresh_every": 16,
    "matrices": ["gate", "up", "down"],
    "strict": False,
    "svd": "full",
}
"""SD-MoE as the paper sets it (arXiv 2602.12556): common rank 8, bases refreshed every 16 steps, non-strict."""


@dataclass(frozen=True)
class Arm:
    """One training configuration of the study, run once per seed."""

    name: str
    """Directory and table key."""
    label: str
    """Legend and table label."""
    question: str
    """What the arm tests."""
    sdmoe: dict[str, Any] | None = None
    """``model.sdmoe`` settings (the seed is added per run); None trains the vanilla MoE."""
    lr_scale: float = 1.0
    """Peak learning rate as a multiple of the study's."""
    seeds: int = 2
    """How many of the study's seeds this arm runs."""


def _sdmoe(**changes: Any) -> dict[str, Any]:
    return {**PAPER_SDMOE, **changes}


ARMS: tuple[Arm, ...] = (
    Arm("baseline", "baseline MoE", "reference: vanilla MoE, same trunk, data and schedule"),
    Arm("sdmoe", "SD-MoE k=8", "the paper's setting", _sdmoe()),
    Arm(
        "sdmoe_strict",
        "SD-MoE strict",
        "does projecting AdamW's update of W_u change the outcome?",
        _sdmoe(strict=True),
    ),
    Arm("sdmoe_k32", "SD-MoE k=32", "is the shared structure of higher rank than 8?", _sdmoe(rank=32)),
    Arm(
        "sdmoe_reproject",
        "SD-MoE + re-projection",
        "new option: does taking W_u back into the complement at each refresh (reproject_unique) matter?",
        _sdmoe(reproject_unique=True),
    ),
    Arm(
        "sdmoe_tracking",
        "SD-MoE + tracking bases",
        "new options: bases from the directions all experts use most (bases_from: experts) plus re-projection",
        _sdmoe(reproject_unique=True, bases_from="experts"),
    ),
    Arm("baseline_lr4x", "baseline MoE, 4x lr", "paper: the baseline diverges at 4x the learning rate", None, 4.0),
    Arm("sdmoe_lr4x", "SD-MoE k=8, 4x lr", "paper: SD-MoE stays stable at 4x the learning rate", _sdmoe(), 4.0),
)
"""The study's arms, in table order (the baseline first: the other arms are compared with it)."""


@dataclass(frozen=True)
class Study:
    """Model, data, schedule and measurement settings shared by every arm."""

    arch: dict[str, Any] = field(
        default_factory=lambda: {
            "vocab_size": 4096,
            "hidden_dim": 128,
            "n_layers": 4,
            "dense_hidden_dim": 512,
            "max_seq_len": 256,
            "norm_eps": 1.0e-6,
            "tie_embeddings": False,
            "init_std": 0.02,
            "attention": {
                "num_heads": 4,
                "num_kv_heads": 2,
                "head_dim": None,
                "qkv_bias": True,
                "rope_theta": 10000.0,
                "mla": None,
            },
            "moe": {
                "num_experts": 8,
                "top_k": 2,
                "expert_hidden_dim": 256,
                "num_shared_experts": 1,
                "shared_expert_hidden_dim": None,
                "shared_expert_gate": True,
                "score_fn": "softmax",
                "norm_topk_prob": False,
                "routed_scaling_factor": 1.0,
                "n_group": 1,
                "topk_group": 1,
                "group_score_fn": "top2_sum",
                "first_k_dense": 0,
                "capacity_factor": None,
                "aux_loss_coef": 0.01,
                "seq_aux_loss_coef": 0.0,
                "z_loss_coef": 0.001,
                "bias_update_rate": 0.0,
            },
        }
    )
    """Qwen-style MoE: 4 layers, width 128, 8 routed experts of width 256 (top-2) plus one gated shared expert."""
    lr: float = 3e-3
    """Peak learning rate of the 1x arms."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay of the matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients."""
    steps: int = 800
    """Optimizer steps per run."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 256
    """Tokens per sequence."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary trained on the study's training files."""
    val_fraction: float = 0.04
    """Share of the training documents held out as the validation split (loss curves)."""
    heldout_fraction: float = 0.05
    """Share of each source's documents held out entirely (final per-corpus perplexity)."""
    data_seed: int = 1234
    """Seed of the held-out choice, the validation split and the data order: the same for every arm and seed."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """Model seeds (``seed_everything`` and the SD-MoE init); an arm with ``seeds=n`` runs the first n."""
    val_every: int = 50
    """Optimizer steps between validations."""
    val_batches: int = 8
    """Validation batches per validation (the same batches every time)."""
    monitor_every: int = 100
    """Optimizer steps between the spectral, gradient, gate and structure measurements."""
    routing_every: int = 50
    """Optimizer steps per routing-health interval."""
    checkpoint_every: int = 250
    """Optimizer steps between the (keep-last) checkpoints an interrupted run resumes from."""
    accelerator: str = "cpu"
    """Lightning accelerator."""
    precision: str = "32-true"
    """Lightning precision (``bf16-mixed`` on GPUs)."""

    def scaled(self, **changes: Any) -> Study:
        """A copy with some settings changed (``arch`` entries by their dotted name, e.g. ``moe.top_k``)."""
        arch = {key: dict(value) if isinstance(value, dict) else value for key, value in self.arch.items()}
        plain = {}
        for key, value in changes.items():
            if "." in key or key in arch:
                section, _, name = key.rpartition(".")
                (arch[section] if section else arch)[name] = value
            else:
                plain[key] = value
        return replace(self, arch=arch, **plain)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens (targets) per optimizer step."""
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Layout:
    """Where the study keeps its files."""

    out_dir: Path
    """Run directories, summary, figures and table."""
    data_dir: Path
    """Corpus, tokenizer and token cache."""
    train_patterns: tuple[str, ...] = ()
    """Train on these files (paths or globs, .jsonl/.txt) instead of the study corpus; held-out files stay."""
    runs_dir: Path | None = None
    """Where the run directories live (default ``out_dir/runs``): evaluate and report another study's runs,
    which are only read, while the evaluation, summary, table and figures go to ``out_dir``."""

    @property
    def runs_root(self) -> Path:
        return self.runs_dir if self.runs_dir is not None else self.out_dir / "runs"

    @property
    def training_record(self) -> Path:
        """The train stage's timing record, next to the run directories it describes."""
        return self.runs_root.parent / "training.json"

    @property
    def tokenizer(self) -> Path:
        if not self.train_patterns:
            return self.data_dir / "bpe.json"
        # Another training corpus gets its own tokenizer, trained on it.
        digest = hashlib.sha256(json.dumps(sorted(self.train_patterns)).encode()).hexdigest()[:12]
        return self.data_dir / f"bpe-{digest}.json"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def train_files(self) -> list[Path]:
        if self.train_patterns:
            return [Path(pattern) for pattern in self.train_patterns]
        return [self.data_dir / "train" / "kjv.jsonl", self.data_dir / "train" / "shakespeare.jsonl"]

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return self.runs_root / arm.name / f"seed_{seed}"


def data_section(study: Study, layout: Layout) -> dict[str, Any]:
    """The recipe's ``data`` section, every ``DataConfig`` field written out."""
    return {
        "corpus": {
            "data_files": [str(path.resolve()) for path in layout.train_files()],
            "dataset_name": None,
            "dataset_config_name": None,
            "split": "train",
            "text_field": "text",
            "token_field": None,
            "tokenizer": str(layout.tokenizer.resolve()),
            "vocab_size": study.vocab_size,
            "seq_len": study.seq_len,
            "cache_dir": str(layout.cache_dir.resolve()),
            "val_fraction": study.val_fraction,
            "num_proc": 1,
            "streaming": False,
            "streaming_val_docs": 100,
            "shuffle_seed": study.data_seed,
            "shuffle_buffer": 10000,
        },
        "batch_size": study.batch_size,
        "num_workers": 0,
    }


def _callback(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


def run_recipe(study: Study, layout: Layout, arm: Arm, seed: int) -> dict[str, Any]:
    """The complete ``sdmoe-train fit`` recipe of one arm and seed."""
    run_dir = str(layout.run_dir(arm, seed).resolve())
    model: dict[str, Any] = {
        "arch": study.arch,
        "optim": {
            "lr": study.lr * arm.lr_scale,
            "min_lr_ratio": study.min_lr_ratio,
            "weight_decay": study.weight_decay,
            "decay_embeddings": False,
            "betas": list(study.betas),
            "eps": 1e-8,
            "warmup_steps": study.warmup_steps,
            "schedule": "cosine",
            "decay_fraction": 0.2,
        },
    }
    if arm.sdmoe is not None:
        model["sdmoe"] = {**arm.sdmoe, "seed": seed}
    callbacks = [
        _callback(
            "sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
            dirpath=f"{run_dir}/checkpoints",
            every_n_train_steps=study.checkpoint_every,
            save_last=True,
            keep_last_k=1,
        ),
        _callback(
            "sdmoe_train.lightning.callbacks.RoutingHealthMonitor", every_n_steps=study.routing_every, per_expert=False
        ),
        _callback(
            "sdmoe_train.lightning.callbacks.SpectralOverlapMonitor",
            every_n_steps=study.monitor_every,
            rank=8,
            svd="full",
        ),
        _callback(
            "sdmoe_train.lightning.callbacks.GradientAlignmentMonitor",
            every_n_steps=study.monitor_every,
            window=8,
            rank=8,
            common_rank=8,
            svd="full",
        ),
        _callback(
            "sdmoe_train.lightning.callbacks.GateAlignmentMonitor", every_n_steps=study.monitor_every, directions=8
        ),
        _callback("evidence_probe.MechanismProbe", every_n_steps=study.monitor_every, rank=8),
    ]
    return {
        "seed_everything": seed,
        "model": model,
        "data": data_section(study, layout),
        "trainer": {
            "accelerator": study.accelerator,
            "devices": 1,
            "precision": study.precision,
            "max_steps": study.steps,
            "val_check_interval": study.val_every,
            "limit_val_batches": study.val_batches,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 10,
            "gradient_clip_val": 1.0,
            "enable_progress_bar": False,
            # No logger: the CLI's CSV logger writes each attempt to <run_dir>/logs/version_N.
            "default_root_dir": run_dir,
            "callbacks": callbacks,
        },
    }
