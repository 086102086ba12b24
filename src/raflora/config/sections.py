"""The run configuration's sections: frozen dataclasses whose fields carry their help text and
bounds (:func:`~raflora.schema.setting`); every key is listed in ``docs/configuration.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raflora.schema import Bounds, Section, setting

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FLConfig",
    "FlowerConfig",
    "LoRAConfig",
    "OutputConfig",
    "PrivacyConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
]

TaskName = Literal[
    "synthetic",
    "digits",
    "image-classification",
    "text-classification",
    "math-reasoning",
    "commonsense",
]
Engine = Literal["local", "flower"]
Device = Literal["cpu", "cuda", "auto"]
DType = Literal["float32", "bfloat16", "float16"]
LRSchedule = Literal["linear", "constant"]
Optimizer = Literal["adamw", "sgd"]
PrivacySampling = Literal["poisson", "fixed"]
PrivacyNoise = Literal["server", "client"]
PrivacyAccountant = Literal["rdp", "pld"]
Quantization = Literal["none", "nf4", "fp4", "int8"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig(Section):
    """What is trained: the task, its model and dataset, and how examples are read."""

    name: TaskName = field(
        default="digits",
        metadata=_help(
            "Task: synthetic, digits, image-classification, text-classification, "
            "math-reasoning or commonsense."
        ),
    )
    model: str | None = field(
        default=None,
        metadata=_help("Model: a Hugging Face hub name or a local directory (None: task default)."),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help("Dataset: a hub name or a local file/directory (None: the task's default)."),
    )
    text_column: str | None = field(
        default=None, metadata=_help("Column holding the input text (None: task default).")
    )
    label_column: str | None = field(
        default=None, metadata=_help("Column holding the label/target (None: task default).")
    )
    image_column: str | None = field(
        default=None, metadata=_help("Column holding the image (None: task default).")
    )
    max_length: int = setting(128, "Maximum tokenized sequence length.", ge=1)
    num_eval_samples: int | None = setting(
        None, "Cap on evaluation examples (None: the whole eval split).", ge=1
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("Task-specific extra options.")
    )
    quantization: Quantization = field(
        default="none",
        metadata=_help(
            "Frozen base in low precision (QLoRA; docs/quantization.md): none, nf4 or fp4 "
            "(4-bit) or int8, through transformers' BitsAndBytesConfig (needs bitsandbytes: "
            "raflora[quantization]). The adapted linear layers are quantised, the heads and "
            "LoRA factors stay in the run's dtype; merges into the base become a float32 "
            "residual beside each quantised layer."
        ),
    )


@dataclass(frozen=True)
class FLConfig(Section):
    """Federation: clients, rounds and the heterogeneous rank assignment."""

    num_clients: int = setting(100, "Total number of clients.", ge=1)
    clients_per_round: int = setting(10, "Clients sampled per round (≤ num_clients).", ge=1)
    rounds: int = setting(100, "Number of federated rounds.", ge=1)
    rank_levels: list[int] = field(
        default_factory=lambda: [8, 16, 32, 48, 64],
        metadata=_help("LoRA ranks clients can have; strictly increasing, positive."),
    )
    rank_probs: list[float] | None = field(
        default=None,
        metadata=_help("Probability of each rank level (same length, sums to 1; None: uniform)."),
    )


@dataclass(frozen=True)
class DataConfig(Section):
    """How the training data is split across clients."""

    partition: str = field(
        default="iid",
        metadata=_help("Client partition: 'iid', 'dir-a<alpha>' or 'patho-c<c>a<alpha>'."),
    )
    min_samples: int = setting(
        2,
        "Minimum training samples per client under 'dir' and 'patho' (reached by "
        "construction when the first draw misses it).",
        ge=1,
    )


@dataclass(frozen=True)
class TrainConfig(Section):
    """Local training on each client."""

    lr: float = setting(5e-4, "Client learning rate (> 0).", gt=0)
    batch_size: int = setting(32, "Local training batch size.", ge=1)
    local_epochs: int = setting(1, "Local epochs per round.", ge=1)
    weight_decay: float = setting(
        0.0, "Weight decay (≥ 0): decoupled under AdamW, L2 under SGD.", ge=0
    )
    optimizer: Optimizer = field(
        default="adamw",
        metadata=_help("Client optimizer: 'adamw' (the paper's) or 'sgd' (plain, no momentum)."),
    )
    lr_schedule: LRSchedule = field(
        default="linear",
        metadata=_help("'linear' (lr·(1 − (t−1)/T) in round t of T) or 'constant'."),
    )
    max_grad_norm: float | None = setting(None, "Gradient clipping norm (None: no clipping).", gt=0)
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Enable gradient checkpointing in the model.")
    )
    concurrent_clients: int = setting(
        1,
        "Clients of a round trained together in one model (one frozen base, one adapter slot "
        "per client, one forward and backward per step; docs/concurrency.md). 1: one after "
        "another. At most fl.clients_per_round.",
        ge=1,
    )


@dataclass(frozen=True)
class LoRAConfig(Section):
    """LoRA adapters (the rank r_k of each client comes from ``fl.rank_levels``)."""

    target_modules: list[str] | str = field(
        default="all-linear",
        metadata=_help("Modules to adapt: a list of module names or 'all-linear'."),
    )
    alpha: str | float = field(
        default="rank",
        metadata=_help("lora_alpha: 'rank' (alpha = r_k, scaling 1) or a positive number."),
    )
    dropout: float = field(
        default=0.0,
        # validate() checks the range with its own message; the bounds are for the JSON Schema
        metadata={
            "help": "LoRA dropout probability in [0, 1).",
            "bounds": Bounds(ge=0, lt=1),
            "own_check": True,
        },
    )
    use_rslora: bool = field(
        default=False, metadata=_help("Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.")
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata=_help("Extra modules trained in full and aggregated (e.g. a classifier head)."),
    )


@dataclass(frozen=True)
class EvalConfig(Section):
    """Evaluation of the global model."""

    every: int = setting(1, "Evaluate every N rounds.", ge=1)
    batch_size: int = setting(64, "Evaluation batch size.", ge=1)
    per_level: bool = field(
        default=False,
        metadata=_help(
            "Also evaluate the model a client of each rank level holds (the global factors "
            "truncated to that rank; FLoRA: the merged model, so equal to the full one): "
            "accuracy@r and eval_loss@r in metrics.jsonl on evaluated rounds."
        ),
    )


@dataclass(frozen=True)
class FlowerConfig(Section):
    """Flower simulation engine settings (used when ``engine: flower``)."""

    supernodes: int | None = setting(
        None, "Number of simulated supernodes (None: num_clients).", ge=1
    )
    cpus_per_client: float = setting(1.0, "CPUs reserved per client (> 0).", gt=0)
    gpus_per_client: float = setting(0.0, "GPU fraction reserved per client (≥ 0).", ge=0)


@dataclass(frozen=True)
class OutputConfig(Section):
    """Where results go."""

    dir: str | None = field(
        default=None, metadata=_help("Output directory (None: a timestamped directory).")
    )
    plots: bool = field(default=True, metadata=_help("Write plots next to the metrics."))
    tensorboard: bool = field(
        default=False,
        metadata=_help(
            "Write each round's scalars and the global update's energy spectrum as TensorBoard "
            "events in RUN_DIR/tensorboard/ (needs the 'tensorboard' extra)."
        ),
    )


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg; docs/privacy.md): each sampled client's
    whole update clipped to ``clip``, Gaussian noise on the sums, ε accounted every round.
    """

    enabled: bool = field(
        default=False,
        metadata=_help("Run with client-level differential privacy (local and Flower engines)."),
    )
    clip: float = setting(
        1.0, "Clip norm C of a client's whole update (all modules, heads, extras).", gt=0
    )
    noise_multiplier: float | None = setting(
        None,
        "Noise multiplier z: N(0, (z C)²) on every coordinate of each sum (set this or "
        "target_epsilon).",
        ge=0,
    )
    target_epsilon: float | None = setting(
        None,
        "Privacy budget ε: z is calibrated for fl.rounds before round 1, and a run stops before "
        "a round would exceed it (set this or noise_multiplier).",
        gt=0,
    )
    delta: float | None = setting(
        None, "δ of the (ε, δ) guarantee (None: 1 / fl.num_clients^1.1).", gt=0, lt=1
    )
    sampling: PrivacySampling = field(
        default="poisson",
        metadata=_help(
            "'poisson': each client joins a round with q = clients_per_round / num_clients "
            "(add-or-remove-one adjacency, as raflora privacy plans); 'fixed': the run's sample "
            "of fl.clients_per_round without replacement (replace-one adjacency)."
        ),
    )
    noise: PrivacyNoise = field(
        default="server",
        metadata=_help(
            "'server': the server adds N(0, (z C)²) to each sum; 'client': each sampled client "
            "adds its share N(0, (z C)² / m) (only the sum is noised in full)."
        ),
    )
    accountant: PrivacyAccountant = field(
        default="rdp",
        metadata=_help("dp-accounting's 'rdp' (any sampling) or 'pld' (poisson only)."),
    )
    adaptive_clip: bool = field(
        default=False,
        metadata=_help(
            "Adaptive clipping (Andrew et al., NeurIPS 2021): after each round "
            "C ← C·exp(−η (b̃ − γ)), b̃ the noised fraction of unclipped updates (needs "
            "privacy.noise: server and a noise multiplier > 0)."
        ),
    )
    clip_quantile: float = setting(
        0.5,
        "Adaptive clipping's target quantile γ: the fraction of updates left unclipped.",
        ge=0,
        le=1,
    )
    clip_learning_rate: float = setting(0.2, "Adaptive clipping's geometric learning rate η.", ge=0)
    clip_count_noise_std: float | None = setting(
        None,
        "Adaptive clipping: noise std σ_b of the unclipped count (None: clients_per_round / 20); "
        "it spends part of the noise multiplier, so 2 σ_b must exceed it.",
        gt=0,
    )


@dataclass(frozen=True)
class RunConfig(Section):
    """A complete, resolved run configuration."""

    method: str = field(
        default="raflora",
        metadata=_help("Aggregation method (see raflora.methods.available_methods())."),
    )
    seed: int = setting(0, "Random seed (≥ 0).", ge=0)
    engine: Engine = field(
        default="local", metadata=_help("'local' (in-process loop) or 'flower' (simulation).")
    )
    method_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Method options (see 'Method options' below): {option: value} sets it for every "
            "method run that declares it, {method: {option: value}} for that method only, e.g. "
            "{raflora: {empty_partition: drop}, hetlora: {weighting: samples}}."
        ),
    )
    device: Device = field(default="cpu", metadata=_help("'cpu', 'cuda' or 'auto'."))
    dtype: DType = field(
        default="float32", metadata=_help("Model dtype: 'float32', 'bfloat16' or 'float16'.")
    )
    threads: int | None = setting(
        None,
        "Torch intra-op CPU threads of every process of the run (None: torch's default). "
        "1 gives bit-identical numbers across engines and machines.",
        ge=1,
    )
    task: TaskConfig = field(default_factory=TaskConfig, metadata=_help("Task, model and data."))
    fl: FLConfig = field(default_factory=FLConfig, metadata=_help("Federation settings."))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Client partitioning."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("Local training."))
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=_help("LoRA adapters."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("Evaluation."))
    flower: FlowerConfig = field(default_factory=FlowerConfig, metadata=_help("Flower engine."))
    output: OutputConfig = field(default_factory=OutputConfig, metadata=_help("Outputs."))
    privacy: PrivacyConfig = field(
        default_factory=PrivacyConfig, metadata=_help("Client-level differential privacy.")
    )
