"""The recipe of a study (``nexus-moe run RECIPE``): its sections and every check on them.

:func:`load_recipe` reads a YAML recipe and :func:`check_recipe` validates it whole (fields,
values, and what refers to something else: domains, variants, expert sets, the reference
variant), so a typo fails in seconds with one line naming the field, before any stage runs. The
stages that carry a recipe out are :mod:`nexus_moe.pipeline` and :mod:`nexus_moe.study`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nexus_moe.config import (
    DEFAULT_VOCAB_SIZE,
    Device,
    EmbedConfig,
    EvalConfig,
    Method,
    ModelConfig,
    MoEConfig,
    check_device_name,
    check_option,
    from_dict,
    to_dict,
)
from nexus_moe.corpus import (
    DEFAULT_DOMAINS,
    DEFAULT_MAX_MB_PER_DOMAIN,
    DEFAULT_VAL_FRACTION,
    HELDOUT_DOMAINS,
    check_request,
)
from nexus_moe.errors import NexusError
from nexus_moe.train import TrainConfig


@dataclass
class CorpusSection:
    """Where the text comes from (docs/design.md §11)."""

    domains: list[str] = field(
        default_factory=lambda: [d for d in DEFAULT_DOMAINS if d not in HELDOUT_DOMAINS]
    )
    heldout: list[str] = field(default_factory=lambda: list(HELDOUT_DOMAINS))  # for `extend`
    from_dir: Path | None = None  # the user's own data: one sub-folder per domain
    max_mb_per_domain: float = DEFAULT_MAX_MB_PER_DOMAIN
    val_fraction: float = DEFAULT_VAL_FRACTION


@dataclass
class TokenizerSection:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    path: Path | None = None  # use this tokenizer.json instead of training one

    def __post_init__(self) -> None:
        check_option("vocab_size", self.vocab_size)


DEFAULT_EXPERT_SET = "default"  # the experts branched with `branch_train` as it is


@dataclass
class MoEVariant:
    """One model of the comparison: an upcycling method plus MoEConfig overrides."""

    name: str
    method: Method
    moe: dict[str, Any] = field(default_factory=dict)  # e.g. {router: ac, ac_base: nexus}
    train: bool = True  # train the upcycled model (btm is a dense merge and is not trained)
    experts: str = DEFAULT_EXPERT_SET  # which expert set (Recipe.expert_sets) it is built from
    train_steps: int | None = None  # MoE training steps of this variant; None: moe.train.steps
    # What this variant's MoE training trains (TrainConfig.train_only patterns, e.g.
    # [mlp.experts, router]: the experts' FFNs and routers, the shared attention, norms and
    # embeddings kept); empty: what moe.train says. Keeping the shared weights helps a plug-in
    # MoE (BENCHMARKS.md, "What MoE training trains").
    train_only: list[str] = field(default_factory=list)
    # Train for as many tokens as branching the experts plus MoE training took together (a
    # compute-matched sparse-upcycle baseline: it branches nothing, so it gets those tokens here).
    compute_matched: bool = False
    # How the router rows are placed: nexus's own, or a training-free peer's (upcycle
    # --router-init; docs/design.md §5.8). A peer-routed variant is not extended by the study.
    router_init: str = "nexus"

    def __post_init__(self) -> None:
        check_option("train_steps", self.train_steps, f"moe.variants '{self.name}'.train_steps")
        check_option("router_init", self.router_init, f"moe.variants '{self.name}'.router_init")

    @property
    def kind(self) -> Method:
        """The upcycling method as the enum (an unknown name is a one-line error)."""
        try:
            return Method(self.method)
        except ValueError:
            allowed = ", ".join(m.value for m in Method)
            raise NexusError(
                f"moe.variants '{self.name}': unknown method '{self.method}'; choose one of: "
                f"{allowed}"
            ) from None

    @property
    def produces_dense(self) -> bool:
        """The method merges the experts into a dense model: no router, no MoE overrides."""
        return self.kind.is_dense_merge

    @property
    def copies_seed(self) -> bool:
        """The routed experts are copies of the seed's FFN (no dense experts are used)."""
        return not self.kind.rules.takes_experts


@dataclass
class MoESection:
    """The MoE models to build from the seed and experts, and how to train them."""

    variants: list[MoEVariant] = field(
        default_factory=lambda: [
            MoEVariant("nexus", Method.nexus),
            MoEVariant("moe-linear", Method.moe_linear),
            MoEVariant("btm", Method.btm, train=False),
        ]
    )
    overrides: dict[str, Any] = field(default_factory=dict)  # MoEConfig fields for every variant
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ExtendSection:
    """Add held-out domains to trained MoEs and finetune on a token budget (docs/design.md §7)."""

    domains: list[str] = field(default_factory=list)  # default: corpus.heldout
    variants: list[str] = field(default_factory=lambda: ["nexus", "moe-linear"])
    reset_linear_router: bool = True  # the paper's linear baseline re-initialises its router
    # Also extend every linear-router variant with its trained rows kept and one new row
    # appended (the second linear baseline), reported as "<variant> (appended row)".
    append_linear_baseline: bool = False
    budgets: list[int] = field(default_factory=lambda: [65536])  # finetuning tokens; 0 = none
    new_domain_share: float = 0.5  # share of the finetuning mix from the new domain
    # Calibrated new rows: null, the fixed norm (config.new_row_scale of the router's context
    # times the earlier rows'); a share of the earlier domains' gates on their own experts that
    # the new row may take fits its norm instead (docs/design.md §5.6).
    leak_budget: float | None = None
    # Calibrated new rows: also refit the earlier experts' rows among all the domains
    # (calibrate.refit_earlier_rows; docs/design.md §5.6); false keeps them as they are.
    refit_rows: bool = False
    # Validation tokens per earlier domain for the extended models, whose change on those
    # domains is measured against the MoE before extension scored on the same tokens (a paired
    # difference); None: evaluate.max_tokens. The new domain always gets evaluate.max_tokens.
    earlier_tokens: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # `steps` is set from each budget
    # What the finetune trains, per extended variant: TrainConfig.train_only patterns (e.g.
    # {nexus: [mlp.experts]}: the experts' FFNs only, so the attention, norms, embeddings and
    # router every earlier expert shares stay as they were); a variant not named trains what
    # extend.train says (default: everything).
    train_only: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, budget in enumerate(self.budgets):
            check_option("budgets", budget, f"extend.budgets[{i}]")
        check_option("leak_budget", self.leak_budget)


@dataclass
class StudySection:
    """What `nexus-moe run` measures besides each model's own scores, and how it compares them."""

    reference: str = "nexus"  # the variant every other one is compared with (paired, per seed)
    bounds: bool = True  # oracle- and random-routing scores of every trained MoE
    step0_oracle: bool = True  # and the oracle-routing score of every MoE at step 0
    corrupt: list[float] = field(default_factory=lambda: [0.1, 0.3])  # robustness: token shares
    # Validation tokens per domain for the step-0, oracle, random and corrupted scores (the
    # bounds and probes; the trained and extended models' own scores use evaluate.max_tokens);
    # None: evaluate.max_tokens as well.
    bounds_tokens: int | None = None
    plot: bool = True  # validation-loss curves of the MoE variants as a PNG

    def __post_init__(self) -> None:
        for i, share in enumerate(self.corrupt):
            check_option("corrupt", share, f"study.corrupt[{i}]")


@dataclass
class Recipe:
    """A whole study; every section has defaults (see configs/tiny.yaml for an example)."""

    workdir: Path = Path("runs/default")
    seed: int = 0
    device: str = Device.auto.value  # a Device or cuda:N
    corpus: CorpusSection = field(default_factory=CorpusSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    seed_train: TrainConfig = field(default_factory=TrainConfig)
    branch_train: TrainConfig = field(default_factory=TrainConfig)
    # Further expert sets: name -> branch_train fields to change, e.g. experts whose FFNs alone
    # train: {ffn: {freeze: [embed_tokens, self_attn, norm]}}; a variant picks one by `experts`.
    expert_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    moe: MoESection = field(default_factory=MoESection)
    extend: ExtendSection = field(default_factory=ExtendSection)
    seeds: list[int] = field(default_factory=list)  # MoE stages per seed; default: [seed]
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    study: StudySection = field(default_factory=StudySection)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a whole YAML recipe before any work starts.

    Unknown keys and wrong types name the field (:func:`~nexus_moe.config.from_dict`); then
    :func:`check_recipe` checks what refers to something else. Nothing is written.
    """
    path = Path(path)
    if not path.is_file():
        raise NexusError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NexusError(f"{path}: not valid YAML ({exc})") from exc
    try:
        recipe = from_dict(Recipe, data)
        check_recipe(recipe)
    except NexusError as exc:
        raise NexusError(f"{path}: {exc}") from None
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Raise NexusError naming the field when parts of ``recipe`` do not fit together: domains
    the corpus cannot have, MoE settings upcycling would refuse (unknown keys, values, a router
    without what it needs), extension of variants that do not exist or are dense, windows longer
    than the model's positions, an unknown device."""
    check_device_name(recipe.device, "device")
    c = recipe.corpus
    overlap = [d for d in c.heldout if d in c.domains]
    if overlap:
        raise NexusError(
            f"corpus.heldout: {', '.join(overlap)} also in corpus.domains; a held-out domain is "
            "left out of the first MoE and added by `extend`, so list it in one place only"
        )
    try:
        check_request([*c.domains, *c.heldout], c.from_dir, c.max_mb_per_domain, c.val_fraction)
    except NexusError as exc:
        raise NexusError(f"corpus: {exc}") from None
    if not c.domains:
        raise NexusError("corpus.domains: empty; the MoE needs at least one domain")
    unknown = [d for d in recipe.extend.domains if d not in c.heldout]
    if unknown:
        raise NexusError(
            f"extend.domains: {', '.join(unknown)} not in corpus.heldout "
            f"({', '.join(c.heldout) or 'empty'}); the corpus only holds the domains it lists"
        )
    for name, patterns in recipe.extend.train_only.items():  # types checked at load
        if name not in recipe.extend.variants:
            raise NexusError(
                f"extend.train_only: '{name}' is not one of extend.variants "
                f"({', '.join(recipe.extend.variants) or 'none'}); name a variant that is extended"
            )
        _check_patterns(patterns, f"extend.train_only.{name}", "[mlp.experts]")
    _check_variants(recipe)
    _check_unused_extend_options(recipe)
    _check_seq_lens(recipe)
    _check_study(recipe)


def expert_set_configs(recipe: Recipe) -> dict[str, TrainConfig]:
    """Branch-training config of every expert set: ``default`` (``branch_train`` as it is) and
    each of ``expert_sets`` (``branch_train`` with that set's fields changed)."""
    sets = {DEFAULT_EXPERT_SET: recipe.branch_train}
    for name, overrides in recipe.expert_sets.items():
        if name == DEFAULT_EXPERT_SET:
            raise NexusError(
                f"expert_sets.{name}: '{name}' is the set branch_train makes; pick another name"
            )
        fields = {**to_dict(recipe.branch_train), **overrides}
        sets[name] = from_dict(TrainConfig, fields, f"expert_sets.{name}")
    return sets


def _check_study(recipe: Recipe) -> None:
    """The expert sets, the reference variant, and the expert set each variant is built from."""
    sets = expert_set_configs(recipe)
    names = [v.name for v in recipe.moe.variants]
    if names and recipe.study.reference not in names:
        raise NexusError(
            f"study.reference: '{recipe.study.reference}' is not a variant; choose one of: "
            f"{', '.join(names)}"
        )
    for v in recipe.moe.variants:
        if v.experts not in sets:
            raise NexusError(
                f"moe.variants '{v.name}': experts '{v.experts}' is not an expert set; "
                f"choose one of: {', '.join(sets)} (define others under expert_sets)"
            )


def _check_unused_extend_options(recipe: Recipe) -> None:
    """extend.leak_budget and extend.refit_rows shape calibrated new rows: set while no extended
    variant has a calibrated router (method nexus), nothing would use them."""
    e = recipe.extend
    given = [
        name
        for name, value in (
            ("extend.leak_budget", e.leak_budget),
            ("extend.refit_rows", e.refit_rows),
        )
        if value
    ]
    if not given:
        return
    kinds = {v.name: v.kind for v in recipe.moe.variants}
    if not any(kinds[name].calibrates_by_default for name in e.variants if name in kinds):
        raise NexusError(
            f"{given[0]}: applies to the calibrated routers of method nexus, and none of "
            f"extend.variants ({', '.join(e.variants) or 'none'}) has one; drop {given[0]} or "
            "extend a nexus variant"
        )


def _check_seq_lens(recipe: Recipe) -> None:
    """No stage may cut windows longer than the model's positions."""
    limit = recipe.model.max_seq_len
    sections = {
        "seed_train": recipe.seed_train,
        "branch_train": recipe.branch_train,
        "evaluate": recipe.evaluate,
    }
    trained = [v for v in recipe.moe.variants if v.train]
    if trained:  # sections of stages that will not run keep their defaults harmlessly
        sections["moe.train"] = recipe.moe.train
        if any(recipe.extend.budgets) and recipe.extend.variants:
            sections["extend.train"] = recipe.extend.train
    for name, section in sections.items():
        if section.seq_len > limit:
            raise NexusError(f"{name}.seq_len={section.seq_len} exceeds model.max_seq_len={limit}")


def _check_variants(recipe: Recipe) -> None:
    from nexus_moe.upcycle import moe_config

    allowed = {f.name for f in dataclasses.fields(MoEConfig)}
    _check_keys(recipe.moe.overrides, allowed, "moe.overrides")
    names = [v.name for v in recipe.moe.variants]
    num_domains = len(recipe.corpus.domains)
    for i, variant in enumerate(recipe.moe.variants):
        where = f"moe.variants[{i}] ({variant.name})"
        kind = variant.kind  # an unknown method (a recipe built in code) is a one-line error
        if variant.name in names[:i]:
            raise NexusError(f"{where}: name used by more than one variant")
        _check_patterns(variant.train_only, f"{where}.train_only", "[mlp.experts, router]")
        _check_keys(variant.moe, allowed, f"{where}.moe")
        if not kind.is_moe:
            if variant.moe:
                raise NexusError(
                    f"{where}.moe: btm produces a dense model; MoE settings do not apply"
                )
            continue
        overrides = {**recipe.moe.overrides, **variant.moe}
        if "router_init" in overrides:
            raise NexusError(f"{where}.moe: router_init is the variant's own field, e.g. "
                             "{name: dume, method: nexus, router_init: dume}")  # fmt: skip
        try:  # the MoE config upcycling would build for this variant
            _peer_options(variant, kind, overrides)
            moe_config(kind, recipe.model, num_domains, list(recipe.corpus.domains), overrides)
        except NexusError as exc:
            raise NexusError(f"{where}: {exc}") from None
    if not recipe.moe.variants:
        return  # no MoE is built, so nothing is extended
    trained_moes = [v.name for v in recipe.moe.variants if v.kind.is_moe and v.train]
    peers = [v.name for v in recipe.moe.variants if v.router_init != "nexus"]
    for name in recipe.extend.variants:
        if name in peers:
            raise NexusError(
                f"extend.variants: '{name}' is routed by a training-free peer (router_init); "
                "the study extends nexus-routed MoEs (peers: `make peers`); drop it there"
            )
        if name not in trained_moes:
            default = ", ".join(ExtendSection().variants)
            raise NexusError(
                f"extend.variants: '{name}' is not a trained MoE variant of moe.variants "
                f"(those are: {', '.join(trained_moes) or 'none'}); set extend.variants to the "
                f"ones to extend (default: {default})"
            )


def _peer_options(variant: MoEVariant, kind: Method, overrides: dict[str, Any]) -> None:
    """A peer-routed variant: what upcycle would refuse (the method, the router setting), and
    ``overrides`` completed as upcycle completes them."""
    if variant.router_init == "nexus":
        return
    from nexus_moe.peer_init import upcycle_options
    from nexus_moe.routers.peers import reads_text
    from nexus_moe.upcycle import UpcycleOptions

    text = object() if reads_text(variant.router_init) else None  # stands in for the corpus
    o = UpcycleOptions(moe_overrides=dict(overrides), calibration_shards=text,  # type: ignore[arg-type]
                       router_init=variant.router_init)  # fmt: skip
    overrides.update(upcycle_options(kind, o).moe_overrides or {})


def _check_patterns(patterns: list[str], where: str, example: str) -> None:
    """``train_only`` patterns match parameter names by substring: an empty one matches all."""
    if not all(patterns):
        raise NexusError(
            f"{where}: an empty pattern would name every parameter; use e.g. {example}"
        )


def _check_keys(settings: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise NexusError(
            f"unknown key '{where}.{unknown[0]}'; allowed MoE settings: {', '.join(sorted(allowed))}"
        )
