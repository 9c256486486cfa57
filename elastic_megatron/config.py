"""One typed config tree for every command: OmegaConf structured configs from YAML plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-3", "parallel.tensor=2"])

Every field is documented where it is declared. `load_config` rejects unknown keys, wrong types
and invalid values with a one-line `ConfigError` that names the key and what is allowed. The
defaults of the tree *are* the embedded tiny model, so `load_config(None)` is a runnable run.
Cross-field checks that need the world size (TP x PP x DP) live in `parallel.ParallelLayout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad config value. The message is one line: the key, the problem, what to change."""


@dataclass
class ModelConfig:
    """The hybrid Mamba-Attention parent (Nemotron-H family). Defaults: the tiny CPU demo model."""

    # Layer pattern, one char per layer: M = Mamba-2 mixer, * = attention (GQA), - = MLP.
    hybrid_override_pattern: str = "M-M*-M-M*-"
    hidden_size: int = 192  # residual stream width d_e
    ffn_hidden_size: int = 768  # MLP intermediate width (squared ReLU, no gate, no bias)
    num_attention_heads: int = 8  # query heads per attention layer
    num_query_groups: int = 4  # KV heads (GQA groups); must divide num_attention_heads
    kv_channels: int = 24  # head dim of attention
    mamba_num_heads: int = 16  # Mamba-2 heads
    mamba_head_dim: int = 24  # channels per Mamba head; d_inner = heads * head_dim
    mamba_num_groups: int = 4  # B/C groups; must divide mamba_num_heads
    mamba_state_dim: int = 16  # SSM state size d_s
    vocab_size: int = 0  # 0 = take it from the tokenizer (padded to make_vocab_size_divisible_by)
    make_vocab_size_divisible_by: int = 8  # pad the vocab so every TP shard is equal
    # Real tokens of an imported model whose vocab_size was padded on import (export-hf trims the
    # padding off again); 0 = vocab_size, or the tokenizer's size when vocab_size is 0.
    unpadded_vocab_size: int = 0
    # The Hugging Face config.json a parent was imported from (`import-hf` copies it into the run
    # directory): export-hf keeps its token ids and generation settings. Empty = not imported.
    hf_source: str = ""
    norm_epsilon: float = 1e-5  # RMSNorm eps
    init_method_std: float = 0.02  # std of normal weight init
    max_sequence_length: int = 4096  # longest sequence the model will see (no position embedding)
    # Per-layer widths of a sliced, heterogeneous model (written by `elastic-megatron slice`); empty =
    # every layer uses the sizes above. One entry per layer of that type, in pattern order.
    layer_ffn_hidden_sizes: list[int] = field(default_factory=list)  # per MLP layer
    layer_mamba_num_heads: list[int] = field(default_factory=list)  # per Mamba layer
    layer_mamba_head_dims: list[int] = field(default_factory=list)  # per Mamba layer
    layer_num_attention_heads: list[int] = field(default_factory=list)  # per attention layer
    # Layer implementations and Mamba kernels, a ladder probed once per process and printed once
    # (compat/backends.py): te (Transformer Engine spec; CUDA + transformer-engine), triton
    # (megatron's local layers + mamba-ssm's Triton scan and gated norm; CUDA + mamba-ssm, its CUDA
    # extensions not needed), torch (local layers + the pure-PyTorch scan; anywhere). auto takes
    # the first rung that runs here; local = local layers with the best kernels here (triton, else
    # torch). A forced rung this machine cannot run stops with one line saying why.
    backend: str = "auto"

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    def for_layer(self, index: int) -> "ModelConfig":
        """This config with layer `index`'s own widths (heterogeneous sliced models)."""
        from dataclasses import replace

        kind = self.hybrid_override_pattern[index]
        k = self.hybrid_override_pattern[:index].count(kind)
        pick = lambda values, default: values[k] if values else default  # noqa: E731
        if kind == "-":
            return replace(self, ffn_hidden_size=pick(self.layer_ffn_hidden_sizes, self.ffn_hidden_size))
        if kind == "M":
            return replace(self, mamba_num_heads=pick(self.layer_mamba_num_heads, self.mamba_num_heads),
                           mamba_head_dim=pick(self.layer_mamba_head_dims, self.mamba_head_dim))
        return replace(self, num_attention_heads=pick(self.layer_num_attention_heads, self.num_attention_heads))

    @property
    def heterogeneous(self) -> bool:
        return bool(self.layer_ffn_hidden_sizes or self.layer_mamba_num_heads or self.layer_mamba_head_dims
                    or self.layer_num_attention_heads)


@dataclass
class ParallelConfig:
    """How the run is split over processes: TP x PP x DP must equal the world size."""

    tensor: int = 1  # tensor-parallel size (splits heads, FFN and vocab)
    pipeline: int = 1  # pipeline-parallel size (splits the layer pattern)
    data: int = 0  # data-parallel size; 0 = world_size / (tensor * pipeline)
    context: int = 1  # context parallel: not supported yet, must be 1
    expert: int = 1  # expert parallel: not supported (no MoE), must be 1
    # Uneven pipeline split: layers on the first / last stage (None = split evenly).
    layers_in_first_stage: Optional[int] = None
    layers_in_last_stage: Optional[int] = None
    distributed_optimizer: bool = False  # shard optimizer state over DP ranks (megatron ZeRO-1)
    backend: str = "auto"  # torch.distributed backend: auto (nccl with CUDA, else gloo), nccl, gloo
    # Sequence parallelism in train and elastic-train (megatron's, with TP > 1; a no-op at TP 1, as
    # in Megatron-LM): the residual stream, norms and layer outputs live split along the sequence
    # over the TP ranks ([s/TP, b, h]), all-gathered before each column-parallel projection and
    # reduce-scattered after each row-parallel one, instead of replicated. Same numbers, 1/TP of those
    # activations. Sequence lengths must divide by TP. The other jobs run without it.
    sequence_parallel: bool = False


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = "synthetic"  # synthetic (embedded reasoning corpus) or indexed (.bin/.idx)
    tokenizer: str = "char"  # char (built-in) or a Hugging Face tokenizer name/path
    seq_length: int = 128  # tokens per training sample
    # synthetic: problem difficulty, as the number of written-out steps per problem
    min_steps: int = 2
    max_steps: int = 4
    # indexed: megatron data prefixes (path without .bin/.idx), optionally weighted: ["0.7", "a", "0.3", "b"]
    paths: list[str] = field(default_factory=list)
    split: str = "98,1,1"  # train,valid,test split of indexed documents
    num_workers: int = 0  # DataLoader workers


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # sequences per micro-batch per DP rank
    global_batch_size: int = 16  # sequences per optimizer step; a multiple of micro * DP
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # floor of the cosine decay
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables
    seed: int = 1234  # model init, data order and dropout all derive from it
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    # Activation recomputation per layer (model/recompute.py): none keeps every activation; full
    # keeps only each layer's input and recomputes the rest in the backward (~1 extra forward).
    # Needed for long sequences: the paper's stage 2 (49K tokens) does not fit without it.
    recompute: str = "none"
    eval_interval: int = 50  # steps between held-out evaluations; 0 disables
    eval_batches: int = 4  # micro-batches per held-out evaluation
    # Stop (after writing a checkpoint) once this global step is reached, without changing the LR
    # schedule, which still runs to train.steps. For job time limits; 0 = run to train.steps.
    exit_at_step: int = 0


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing checkpoints."""

    dir: str = ""  # where checkpoints go; empty = <logging.out_dir>/checkpoints
    save_interval: int = 0  # steps between saves; 0 = only at the end
    resume: bool = True  # continue from the newest checkpoint in dir if there is one
    load: str = ""  # start from these weights (a checkpoint dir) instead of random init


@dataclass
class LoggingConfig:
    """Where metrics go."""

    out_dir: str = "runs/tiny"  # run directory: metrics.jsonl, config.yaml, checkpoints
    log_interval: int = 1  # steps between metric records
    progress: bool = True  # tqdm progress bar on rank 0
    wandb_mode: str = "offline"  # offline (default, no network), online, disabled
    wandb_project: str = "elastic-megatron"
    wandb_run_name: str = ""  # empty = the out_dir's name


@dataclass
class ElasticConfig:
    """The nested family: budgets, the choices on each axis, and the routers that pick subnets."""

    # Target sizes, largest first: parameter counts ("6B", "2.5M", "900K") or fractions of the
    # parent's parameters (1.0, 0.75). The full model is always trained as the first budget.
    budgets: list[str] = field(default_factory=lambda: ["1.0", "0.75", "0.5"])
    # Allowed sizes per axis: fractions of the parent (0 < f <= 1) or integers. The full size is
    # always added. Validated against TP and Mamba / KV group divisibility.
    hidden: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    mamba_heads: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    mamba_head_dim: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    attn_heads: list[float] = field(default_factory=lambda: [1.0, 0.5])
    ffn: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    depth: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8])
    # Per-layer (heterogeneous) choices for these axes; the others are one choice model-wide.
    heterogeneous: list[str] = field(default_factory=lambda: ["ffn", "mamba_heads"])
    # How the router's choices enter the forward while it learns (`router: learn` stages): soft
    # (default) multiplies probability-weighted prefix masks into the full-width computation, so the
    # task loss tells the router which size is better; hard computes on the drawn subnet's weight
    # prefixes only (cost ~ budget) with a straight-through gate. `router: frozen` stages always run
    # the deployed subnets hard. docs/architecture.md, "the default recipe", says why.
    mode: str = "soft"
    # The deployed subnet of a budget (what slice / export-hf cut, and what frozen stages train) is
    # the router's most probable one whose exact cost is within this fraction of the target
    # (elastic/deploy.py); 0 = the plain argmax of the router's logits, wherever it lands.
    deploy_tolerance: float = 0.02
    # Router proposes, validation disposes: at the start of the first `router: frozen` stage, up to
    # this many on-budget proposals per budget (the router's subnet, then the same search with one
    # axis a step below, then above, the router's mode, elastic/deploy.py; 13 = every one of the six
    # axes both ways) are scored on held-out data (deploy_metric) and the best is deployed; the
    # checkpoint records that family, so slice / export-hf / generate cut the same one. Scoring runs
    # on every layout (train/deploy_score.py). 1 = the router's subnet only. Default 13: measured on
    # the demo over three seeds (issue 23, docs/results.md), the full and 0.75 budgets gain and the
    # 0.5 one holds; the search costs 26 forward passes over the samples (14 s of the demo on 2 cores
    # at the default 64 problems, 30-38 s at 128).
    deploy_candidates: int = 13
    # What scores a proposal: exact = teacher-forced exact match on held-out problems of the stage's
    # step range (the synthetic corpus only: "greedy decoding writes the reference solution", one
    # forward; ties broken by the solution-token loss); solution = the same problems ranked by their
    # solution-token loss first (measured on the demo: the same family in 2 of 3 seeds, a worse 0.5
    # model in the third, docs/results.md); loss = the mean next-token loss on validation sequences
    # (any data); auto = exact on the synthetic corpus, else loss.
    deploy_metric: str = "auto"
    # held-out problems (exact, solution) or sequences (loss) per proposal; 0 = 64 problems or 16
    # sequences (64 problems picked the same family as 128 in all three seeds of the demo's study)
    deploy_calibration_samples: int = 0
    importance_batches: int = 8  # calibration micro-batches for importance estimation
    importance_path: str = ""  # saved scores (.pt); empty = <logging.out_dir>/importance.pt
    depth_metric: str = "nmse"  # layer ranking: nmse (iterative normalized MSE of logits) or cosine
    # TP size the sorted parent's FFN layout was written under (set by `importance`; 0 = not
    # sorted). Any run re-lays the FFN for its own TP size when it loads the parent (an exact
    # permutation, elastic/sorting.py), so train, slice and export under any TP; checkpoints that
    # record their layout (all that this package writes) take precedence over this value.
    sort_tensor_parallel: int = 0
    # Hand-picked subnets, one entry per budget (same order): "" = the router chooses that budget's
    # subnet; else a subnet.json written by `elastic-megatron slice`, or a homogeneous spec such as
    # "hidden=0.75,mamba_heads=0.5,attn_heads=0.5,ffn=0.5" (fractions or sizes; axes left out stay
    # full). A hand-picked budget always trains and slices that fixed subnet (prune-and-distill).
    subnets: list[str] = field(default_factory=list)


@dataclass
class RouterConfig:
    """One router per axis: one-hot budget -> Linear -> LeakyReLU -> Linear -> Gumbel-softmax."""

    hidden_size: int = 256  # router MLP width
    lr: float = 1e-2  # router learning rate (its own Adam)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed linearly ...
    tau_end: float = 0.05  # ... to this value over the elastic training steps
    scale_start: float = 1.0  # router logit scale, annealed linearly ...
    scale_end: float = 10.0  # ... to this value
    budget_weight: float = 1.0  # lambda: weight of the budget loss in the total loss
    cost: str = "params"  # params (closed-form parameter count) or memory (weights + KV cache + Mamba state)
    memory_seq_length: int = 8192  # sequence length the memory cost assumes
    memory_batch_size: int = 1  # batch size the memory cost assumes
    bytes_per_param: int = 2  # bf16 weights / caches in the memory cost


@dataclass
class StageConfig:
    """One curriculum stage of elastic training."""

    name: str = "stage"
    steps: int = 100  # optimizer steps in this stage
    seq_length: int = 0  # tokens per sample; 0 = data.seq_length
    global_batch_size: int = 0  # 0 = train.global_batch_size
    micro_batch_size: int = 0  # 0 = train.micro_batch_size (long contexts want smaller micro-batches)
    # Probability of each budget in elastic.budgets (same order); empty = uniform.
    budget_probs: list[float] = field(default_factory=list)
    # How micro-batches get their budget: random = each drawn independently from budget_probs;
    # stratified = every window of 10 x (number of budgets) micro-batches holds each budget exactly
    # its share (largest remainder), in a seeded random order, so no seed starves a budget for a
    # stretch (the demo's smallest got 12 of the last 30 stage-1 steps in one seed, 22 in another).
    # Default random: measured on the demo, stratified moved the router's 0.5 choice to a worse
    # subnet in 2 of 2 seeds (issue 23, docs/results.md).
    budget_sampling: str = "random"
    # Synthetic data difficulty in this stage (written-out steps per problem); 0 = data.min/max_steps.
    min_steps: int = 0
    max_steps: int = 0
    # learn: the router trains (elastic.mode decides soft or hard compute); frozen: the router stops,
    # every budget runs its deployed subnet (elastic/deploy.py), sliced (hard) compute, so the
    # subnets that will ship are the ones trained, at sliced cost on long sequences.
    router: str = "learn"
    # Activation recomputation in this stage: none | full; "" = train.recompute. E.g. full for the
    # long-context stage only, where activations outgrow the GPU, and none (no extra forward) for
    # the short stage (`elastic-megatron plan` shows what each stage needs).
    recompute: str = ""


def _default_curriculum() -> list:
    # The paper: stage 1 short context with uniform budgets; stage 2 ~6x longer context weighted
    # 0.5 / 0.3 / 0.2 from the largest budget to the smallest.
    return [StageConfig(name="short", steps=150),
            StageConfig(name="long", steps=50, seq_length=768, global_batch_size=8, micro_batch_size=2,
                        budget_probs=[0.5, 0.3, 0.2],
                        min_steps=8, max_steps=12, router="frozen")]


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher during elastic training."""

    teacher: str = ""  # teacher checkpoint; empty = the parent being elastified (checkpoint.load)
    temperature: float = 1.0  # softmax temperature of the KD loss (the loss is scaled by T^2)
    kd_weight: float = 1.0  # weight of KL(teacher || student)
    ce_weight: float = 0.0  # weight of the plain next-token cross entropy
    # Intermediate-layer distillation: layers (0-based, pattern order) whose output residual stream
    # the student matches to the teacher's, as normalized MSE on the student's kept hidden channels,
    # weighted by intermediate_weight and averaged over the layers; empty = off.
    intermediate_layers: list[int] = field(default_factory=list)
    intermediate_weight: float = 1.0


@dataclass
class RunConfig:
    """The whole tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curriculum: list[StageConfig] = field(default_factory=_default_curriculum)


# --------------------------------------------------------------------------- loading

_CHOICES = {
    "data.source": ("synthetic", "indexed"),
    "model.backend": ("auto", "local", "te", "triton", "torch"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.recompute": ("none", "full"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "elastic.deploy_metric": ("auto", "exact", "solution", "loss"),
    "elastic.mode": ("hard", "soft"),
    "elastic.depth_metric": ("nmse", "cosine"),
    "router.cost": ("params", "memory"),
}


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = _node_at(parent)
        allowed = ", ".join(f.name for f in fields(node)) if node else ""
        return f"config key '{key}': unknown key; allowed keys here: {allowed}"
    return f"config key '{key}': {msg}"


def _node_at(path: str):
    node: Any = RunConfig
    for part in filter(None, path.split(".")):
        sub = {f.name: f for f in fields(node)}.get(part)
        if sub is None:
            return None
        node = sub.default_factory() if sub.default_factory is not None else None  # type: ignore[misc]
        node = type(node) if is_dataclass(node) else None
        if node is None:
            return None
    return node


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """YAML (or preset name) + dotted `key=value` overrides -> a validated RunConfig."""
    base = OmegaConf.structured(RunConfig)
    try:
        if path:
            base = OmegaConf.merge(base, _load_yaml(resolve_config_path(path)))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-3")
            key, value = item.split("=", 1)
            # update (not merge of a dotlist) so that list items work: curriculum.1.steps=50
            OmegaConf.update(base, key, yaml.safe_load(value) if value else "", merge=True)
        cfg: RunConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate(cfg)
    return cfg


def _load_yaml(p: Path) -> DictConfig:
    """The file's top-level mapping; bad YAML syntax or a non-mapping top level is a one-line ConfigError."""
    try:
        node = OmegaConf.load(p)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}': invalid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:  # a directory, an unreadable file, or a scalar top level
        raise ConfigError(f"config file '{p}': {' '.join(str(exc).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file '{p}': the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in fields(RunConfig))}), not a list")
    return node


def resolve_config_path(path: str) -> Path:
    """A YAML path, or the name of a preset in configs/ ("tiny", "nemotron_nano_12b_v2")."""
    p = Path(path)
    if p.exists():
        return p
    preset = CONFIG_DIR / f"{path}.yaml"
    if preset.exists():
        return preset
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.exists() else []
    raise ConfigError(f"config file '{path}' not found; presets: {', '.join(names)}")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def validate(cfg: RunConfig) -> None:
    """Value checks that do not depend on the world size. Raises ConfigError."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            _fail(key, f"'{value}' is not one of {', '.join(allowed)}")
    m = cfg.model
    if not m.hybrid_override_pattern or not re.fullmatch(r"[M*\-]+", m.hybrid_override_pattern):
        _fail("model.hybrid_override_pattern",
              f"'{m.hybrid_override_pattern}' must be a non-empty string of M (Mamba), * (attention), - (MLP)")
    for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                 "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
                 "make_vocab_size_divisible_by", "max_sequence_length"):
        if getattr(m, name) <= 0:
            _fail(f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    for name, char in (("layer_ffn_hidden_sizes", "-"), ("layer_mamba_num_heads", "M"),
                       ("layer_mamba_head_dims", "M"), ("layer_num_attention_heads", "*")):
        values, n = getattr(m, name), m.hybrid_override_pattern.count(char)
        if values and len(values) != n:
            _fail(f"model.{name}", f"has {len(values)} entries but the pattern has {n} '{char}' layers")
        if any(v <= 0 for v in values):
            _fail(f"model.{name}", f"entries must be > 0, got {values}")
        if name == "layer_mamba_num_heads" and any(v % m.mamba_num_groups for v in values):
            _fail(f"model.{name}", f"entries must be multiples of model.mamba_num_groups ({m.mamba_num_groups})")
        if name == "layer_num_attention_heads" and any(v % m.num_query_groups for v in values):
            _fail(f"model.{name}", f"entries must be multiples of model.num_query_groups ({m.num_query_groups})")
    if m.vocab_size < 0:
        _fail("model.vocab_size", f"must be >= 0 (0 = from the tokenizer), got {m.vocab_size}")
    if m.unpadded_vocab_size < 0 or (m.vocab_size and m.unpadded_vocab_size > m.vocab_size):
        _fail("model.unpadded_vocab_size", f"{m.unpadded_vocab_size} must be between 0 and model.vocab_size "
                                           f"({m.vocab_size})")
    if m.num_attention_heads % m.num_query_groups:
        _fail("model.num_query_groups",
              f"{m.num_query_groups} must divide model.num_attention_heads ({m.num_attention_heads})")
    if m.mamba_num_heads % m.mamba_num_groups:
        _fail("model.mamba_num_groups",
              f"{m.mamba_num_groups} must divide model.mamba_num_heads ({m.mamba_num_heads})")
    if not 0 < m.norm_epsilon < 1:
        _fail("model.norm_epsilon", f"must be in (0, 1), got {m.norm_epsilon}")
    if m.init_method_std <= 0:
        _fail("model.init_method_std", f"must be > 0, got {m.init_method_std}")

    p = cfg.parallel
    for name in ("tensor", "pipeline", "context", "expert"):
        if getattr(p, name) < 1:
            _fail(f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    if p.data < 0:
        _fail("parallel.data", f"must be >= 0 (0 = derive from the world size), got {p.data}")
    if p.context != 1:
        _fail("parallel.context", f"context parallelism is not supported yet; set it to 1 (got {p.context})")
    if p.expert != 1:
        _fail("parallel.expert", "expert parallelism needs MoE layers, which this model has none of; set it to 1")

    d = cfg.data
    if d.seq_length <= 1:
        _fail("data.seq_length", f"must be > 1, got {d.seq_length}")
    if p.sequence_parallel and d.seq_length % p.tensor:
        _fail("data.seq_length", f"{d.seq_length} must be a multiple of parallel.tensor ({p.tensor}) with "
                                 "parallel.sequence_parallel=true")
    if d.seq_length > m.max_sequence_length:
        _fail("data.seq_length", f"{d.seq_length} exceeds model.max_sequence_length ({m.max_sequence_length})")
    if not 1 <= d.min_steps <= d.max_steps:
        _fail("data.min_steps", f"need 1 <= min_steps <= max_steps, got {d.min_steps} and {d.max_steps}")
    if d.source == "indexed" and not d.paths:
        _fail("data.paths", "data.source=indexed needs at least one .bin/.idx prefix in data.paths")
    if not re.fullmatch(r"\d+(\.\d+)?,\d+(\.\d+)?,\d+(\.\d+)?", d.split):
        _fail("data.split", f"'{d.split}' must be three comma-separated weights, e.g. 98,1,1")

    t = cfg.train
    for name in ("steps", "micro_batch_size", "global_batch_size"):
        if getattr(t, name) <= 0:
            _fail(f"train.{name}", f"must be > 0, got {getattr(t, name)}")
    if t.global_batch_size % t.micro_batch_size:
        _fail("train.global_batch_size",
              f"{t.global_batch_size} must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
    if t.lr <= 0:
        _fail("train.lr", f"must be > 0, got {t.lr}")
    if t.min_lr < 0 or t.min_lr > t.lr:
        _fail("train.min_lr", f"need 0 <= min_lr <= train.lr, got lr={t.lr}, min_lr={t.min_lr}")
    if t.warmup_steps < 0:
        _fail("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            _fail(f"train.{name}", f"Adam betas must be in [0, 1), got {getattr(t, name)}")
    if t.weight_decay < 0:
        _fail("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.clip_grad < 0:
        _fail("train.clip_grad", f"must be >= 0 (0 disables), got {t.clip_grad}")
    if not 0 <= t.exit_at_step <= t.steps:
        _fail("train.exit_at_step", f"must be in [0, train.steps={t.steps}], got {t.exit_at_step}")
    for name in ("eval_interval", "eval_batches"):
        if getattr(t, name) < 0:
            _fail(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")

    if cfg.checkpoint.save_interval < 0:
        _fail("checkpoint.save_interval", f"must be >= 0, got {cfg.checkpoint.save_interval}")
    if cfg.logging.log_interval <= 0:
        _fail("logging.log_interval", f"must be > 0, got {cfg.logging.log_interval}")
    if not cfg.logging.out_dir:
        _fail("logging.out_dir", "must not be empty")
    _validate_elastic(cfg)


_AXES = ("hidden", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "depth")


def parse_budget(text: str) -> float | int:
    """"6B" -> 6_000_000_000, "2.5M" -> 2_500_000, "900K" -> 900_000, "0.75" -> 0.75 (a fraction)."""
    t = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:] if t else "")
    try:
        value = float(t[:-1] if scale else t)
    except ValueError:
        raise ConfigError(f"config key 'elastic.budgets': '{text}' is not a budget; use e.g. 6B, 2.5M or 0.75") from None
    if scale:
        return int(value * scale)
    if not 0 < value <= 1:
        raise ConfigError(f"config key 'elastic.budgets': fraction {text} must be in (0, 1]; "
                          "or give a parameter count such as 6B")
    return value


def _validate_elastic(cfg: RunConfig) -> None:
    e, r, d = cfg.elastic, cfg.router, cfg.distill
    if not e.budgets:
        _fail("elastic.budgets", "needs at least one budget")
    for b in e.budgets:  # first: the curriculum's per-budget settings below are read against them
        parse_budget(b)
    if d.temperature <= 0 or d.kd_weight < 0 or d.ce_weight < 0 or d.kd_weight + d.ce_weight == 0:
        _fail("distill.temperature", "need temperature > 0, kd_weight >= 0, ce_weight >= 0 and one weight > 0")
    bad = [i for i in d.intermediate_layers if not 0 <= i < cfg.model.num_layers]
    if bad:
        _fail("distill.intermediate_layers", f"{bad} outside 0..{cfg.model.num_layers - 1} (layers of the pattern)")
    if d.intermediate_weight < 0:
        _fail("distill.intermediate_weight", f"must be >= 0, got {d.intermediate_weight}")
    if not cfg.curriculum:
        _fail("curriculum", "needs at least one stage")
    if not 0 <= e.deploy_tolerance < 0.5:
        _fail("elastic.deploy_tolerance", f"must be in [0, 0.5), got {e.deploy_tolerance}")
    if e.deploy_candidates < 1:
        _fail("elastic.deploy_candidates", f"must be >= 1 (1 = the router's subnet only), got {e.deploy_candidates}")
    if e.deploy_metric in ("exact", "solution") and cfg.data.source != "synthetic":
        _fail("elastic.deploy_metric", f"{e.deploy_metric} scores held-out problems of the synthetic corpus; with "
              f"data.source={cfg.data.source} use loss (or auto)")
    if e.deploy_calibration_samples < 0:
        _fail("elastic.deploy_calibration_samples", f"must be >= 0 (0 = 64 problems or 16 sequences, by "
              f"elastic.deploy_metric), got {e.deploy_calibration_samples}")
    for i, st in enumerate(cfg.curriculum):
        key = f"curriculum.{i}"
        if st.router not in ("learn", "frozen"):
            _fail(f"{key}.router", f"'{st.router}' is not one of learn, frozen")
        if st.recompute not in ("", *_CHOICES["train.recompute"]):
            _fail(f"{key}.recompute", f"'{st.recompute}' is not one of none, full (or \"\" for train.recompute)")
        if st.steps <= 0:
            _fail(f"{key}.steps", f"must be > 0, got {st.steps}")
        if st.seq_length < 0 or st.seq_length > cfg.model.max_sequence_length:
            _fail(f"{key}.seq_length", f"must be in [0, model.max_sequence_length], got {st.seq_length}")
        if cfg.parallel.sequence_parallel and st.seq_length % cfg.parallel.tensor:
            _fail(f"{key}.seq_length", f"{st.seq_length} must be a multiple of parallel.tensor "
                                       f"({cfg.parallel.tensor}) with parallel.sequence_parallel=true")
        if st.global_batch_size < 0:
            _fail(f"{key}.global_batch_size", f"must be >= 0, got {st.global_batch_size}")
        gbs = st.global_batch_size or cfg.train.global_batch_size
        mbs = st.micro_batch_size or cfg.train.micro_batch_size
        if st.micro_batch_size < 0 or gbs % mbs:
            _fail(f"{key}.global_batch_size", f"{gbs} must be a multiple of the micro-batch size {mbs}")
        if st.budget_probs and (len(st.budget_probs) != len(e.budgets) or any(p < 0 for p in st.budget_probs)
                                or abs(sum(st.budget_probs) - 1) > 1e-6):
            _fail(f"{key}.budget_probs", f"{st.budget_probs} must be {len(e.budgets)} non-negative numbers "
                                         "summing to 1 (one per elastic.budgets)")
        if st.budget_sampling not in ("random", "stratified"):
            _fail(f"{key}.budget_sampling", f"'{st.budget_sampling}' is not one of random, stratified")
        if (st.min_steps or st.max_steps) and not 1 <= st.min_steps <= st.max_steps:
            _fail(f"{key}.min_steps", f"need 1 <= min_steps <= max_steps, got {st.min_steps}, {st.max_steps}")
    if e.subnets:
        if len(e.subnets) != len(e.budgets):
            _fail("elastic.subnets", f"has {len(e.subnets)} entries but elastic.budgets has {len(e.budgets)}; give "
                                     "one per budget (\"\" lets the router choose)")
        from .elastic.subnet import subnet_from_spec

        for spec in e.subnets:
            if spec:
                subnet_from_spec(spec, cfg.model, tp=cfg.parallel.tensor)
    for axis in _AXES:
        for v in getattr(e, axis):
            if v <= 0:
                _fail(f"elastic.{axis}", f"choice {v} must be > 0 (a fraction <= 1 or an integer size)")
    for axis in e.heterogeneous:
        if axis not in ("mamba_heads", "mamba_head_dim", "attn_heads", "ffn"):
            _fail("elastic.heterogeneous", f"'{axis}' cannot be per-layer; allowed: mamba_heads, mamba_head_dim, "
                                           "attn_heads, ffn")
    if e.importance_batches <= 0:
        _fail("elastic.importance_batches", f"must be > 0, got {e.importance_batches}")
    if r.hidden_size <= 0 or r.lr <= 0:
        _fail("router.hidden_size", "router.hidden_size and router.lr must be > 0")
    if not 0 < r.tau_end <= r.tau_start:
        _fail("router.tau_end", f"need 0 < tau_end <= tau_start, got {r.tau_start} -> {r.tau_end}")
    if not 0 < r.scale_start <= r.scale_end:
        _fail("router.scale_end", f"need 0 < scale_start <= scale_end, got {r.scale_start} -> {r.scale_end}")
    if r.budget_weight < 0:
        _fail("router.budget_weight", f"must be >= 0, got {r.budget_weight}")
    if r.memory_seq_length <= 0 or r.memory_batch_size <= 0 or r.bytes_per_param <= 0:
        _fail("router.memory_seq_length", "memory_seq_length, memory_batch_size and bytes_per_param must be > 0")
