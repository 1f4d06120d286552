"""Our tensor names <-> a Hugging Face format's, written once per format (docs/design.md §15).

:func:`tensor_map` lists, for a model config and a format, every tensor of the Hugging Face
checkpoint as a :class:`Rule`: where its value comes from among our tensors. Both directions and
every path use that one list:

* export (:func:`export_plan`): each HF tensor produced from a :class:`TensorSource` in our names,
  when it is written: a model in memory, a checkpoint read tensor by tensor, an upcycling plan;
* import (:func:`import_tensors`): the HF tensors checked against the rules from their headers,
  then presented as a :class:`TensorSource` in our names, which builds a model in memory or is
  written tensor by tensor into a checkpoint (or upcycled in place).

Dense Llama-family names already match ours, so the dense rules rename nothing; the MoE rules
write one tensor per expert projection (``experts.{j}.gate_proj.weight``, the Hub layout and what
``save_pretrained`` writes). Values are exact in both directions: the only arithmetic is a factor
of 2 (Qwen2-MoE's shared expert) and the router's expert-embedding matrix on export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from nexus_moe.checkpoint import model_shapes
from nexus_moe.config import ModelConfig
from nexus_moe.errors import NexusError
from nexus_moe.hf.formats import Format, MoEFormat
from nexus_moe.routers import Router, build_router
from nexus_moe.safetensors_io import TensorSource

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Tensors some checkpoints carry that hold nothing our model needs (recomputed on the fly).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Rule:
    """One tensor ``hf`` of shape ``shape`` in the Hugging Face checkpoint.

    * ``copy``: ``ours`` (its ``index``-th slice along dim 0 if given) times ``scale``;
    * ``zero``: all zeros, a tensor the format has and our model lacks. On import it must be
      zero (``why`` says why), and it may be absent unless ``required``;
    * ``gate``: the expert-embedding matrix E of the router ``ours`` (a layer prefix), which
      scores tokens as ``x @ E^T`` like the format's linear gate. On import it becomes the
      linear router's weight.
    """

    kind: Literal["copy", "zero", "gate"]
    hf: str
    shape: tuple[int, ...]
    ours: str = ""
    index: int | None = None
    scale: int = 1  # a power of two, so exact in both directions
    required: bool = True
    why: str = ""


def tensor_map(fmt: Format, cfg: ModelConfig) -> list[Rule]:
    """Every tensor of ``cfg`` in format ``fmt``, in the order the export writes them."""
    ours = {name: shape for name, (shape, _) in model_shapes(cfg).items()}
    moe_prefixes = tuple(
        f"model.layers.{i}.mlp." for i in range(cfg.num_layers) if cfg.is_moe_layer(i)
    )
    if not isinstance(fmt, MoEFormat):
        moe_prefixes = ()
    rules = [
        Rule("copy", name, shape, ours=name)
        for name, shape in ours.items()
        if not name.startswith(moe_prefixes)
    ]
    rules += _missing_biases(fmt, cfg)
    if isinstance(fmt, MoEFormat):
        for i in range(cfg.num_layers):
            if cfg.is_moe_layer(i):
                rules += _moe_block(fmt, cfg, i, ours)
    return rules


def _missing_biases(fmt: Format, cfg: ModelConfig) -> list[Rule]:
    """The attention biases the format always has but ``cfg`` lacks: zeros."""
    dense = fmt.dense
    assert cfg.head_dim is not None
    rules = []
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.self_attn"
        if dense.qkv_bias == "always" and not cfg.attention_bias:
            # Qwen2 stores them; a hand-made folder may omit them.
            why = "our model has no q/k/v biases (attention_bias=false)"
            for proj, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
                rules.append(_zero(f"{prefix}.{proj}_proj.bias", heads * cfg.head_dim, why))
            rules.append(_zero(f"{prefix}.v_proj.bias", cfg.num_kv_heads * cfg.head_dim, why))
        if dense.o_proj_bias_follows_qkv and cfg.attention_bias:
            why = (
                f"our model has no o_proj bias ({dense.model_type} with attention_bias=true "
                "biases o_proj)"
            )
            rules.append(_zero(f"{prefix}.o_proj.bias", cfg.hidden_size, why))
    return rules


def _zero(name: str, size: int, why: str) -> Rule:
    return Rule("zero", name, (size,), required=False, why=why)


def _moe_block(
    fmt: MoEFormat, cfg: ModelConfig, layer: int, ours: dict[str, tuple[int, ...]]
) -> list[Rule]:
    """One MoE block: the gate, each expert's projections, Qwen2-MoE's shared expert."""
    assert cfg.moe is not None
    hidden, num_experts = cfg.hidden_size, cfg.moe.num_experts
    mine = f"model.layers.{layer}.mlp"
    prefix = f"model.layers.{layer}.{fmt.moe_module}"
    # Nexus: E = P(d), the projected domain embeddings (docs/design.md §4.2).
    rules = [Rule("gate", f"{prefix}.gate.weight", (num_experts, hidden), ours=mine)]
    stacked = [f"{mine}.experts.{name}" for name in _PROJECTIONS]
    for j in range(num_experts):
        for hf_name, name in zip(fmt.expert_names, stacked, strict=True):
            hf = f"{prefix}.experts.{j}.{hf_name}.weight"
            rules.append(Rule("copy", hf, ours[name][1:], ours=name, index=j))
    if fmt.has_shared_expert:
        rules += _qwen2_shared_expert(cfg, mine, prefix, ours)
    return rules


def _qwen2_shared_expert(
    cfg: ModelConfig, mine: str, prefix: str, ours: dict[str, tuple[int, ...]]
) -> list[Rule]:
    """Qwen2-MoE scales its shared expert by sigmoid(x . w). A model with that learned gate
    (``shared_expert_gate``, an imported Qwen2-MoE) maps one to one. Otherwise w = 0 makes the
    scale exactly 1/2, so down_proj is doubled (exact in floating point) and the block computes
    ours; without a shared expert the block gets an empty (width 0) one, which adds nothing."""
    assert cfg.moe is not None
    hidden = cfg.hidden_size
    shared = f"{prefix}.shared_expert"
    learned = cfg.moe.shared_expert_gate
    rules = []
    for name, scale in zip(_PROJECTIONS, (1, 1, 1 if learned else 2), strict=True):
        hf = f"{shared}.{name}.weight"
        if cfg.moe.shared_expert:
            mine_name = f"{mine}.shared_expert.{name}.weight"
            rules.append(Rule("copy", hf, ours[mine_name], ours=mine_name, scale=scale))
        else:
            shape = (hidden, 0) if name == "down_proj" else (0, hidden)
            rules.append(Rule("zero", hf, shape, why="the shared expert is empty (width 0)"))
    gate = f"{prefix}.shared_expert_gate.weight"
    if learned:
        mine_gate = f"{mine}.shared_expert_gate.weight"
        rules.append(Rule("copy", gate, ours[mine_gate], ours=mine_gate))
        return rules
    why = (
        "the checkpoint records (nexus_moe.model.moe.shared_expert_gate=false) an always-on "
        "shared expert, exported with an all-zero gate (a constant 1/2); remove the "
        "'nexus_moe' entry of config.json to import the gate as learned"
    )
    rules.append(Rule("zero", gate, (1, hidden), why=why))
    return rules


# --------------------------------------------------------------------------------------------
# export: HF tensors from ours

Producer = Callable[[], Iterable[torch.Tensor]]
# HF tensor name -> (shape, producer of its pieces); the order of tensor_map.
Plan = dict[str, tuple[tuple[int, ...], Producer]]


def export_plan(
    rules: list[Rule],
    cfg: ModelConfig,
    source: TensorSource,
    dtype: torch.dtype,
    routers: dict[str, Router] | None = None,
) -> Plan:
    """Every HF tensor of ``rules`` in ``dtype``, each produced from ``source`` (our names) only
    when it is written and reading only what it needs. ``routers`` (layer prefix -> router)
    gives a model's live routers for the gates; else each is rebuilt from its tensors."""
    plan: Plan = {}
    for rule in rules:
        if rule.kind == "copy":
            producer = _copied(source, rule, dtype)
        elif rule.kind == "zero":
            producer = _zeros(rule.shape, dtype)
        else:
            producer = _gate(source, cfg, rule.ours, dtype, (routers or {}).get(rule.ours))
        plan[rule.hf] = (rule.shape, producer)
    return plan


def _copied(source: TensorSource, rule: Rule, dtype: torch.dtype) -> Producer:
    def pieces() -> list[torch.Tensor]:
        tensor = source.get(rule.ours, rule.index)
        return [(tensor * rule.scale if rule.scale != 1 else tensor).to(dtype)]

    return pieces


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Producer:
    return lambda: [torch.zeros(shape, dtype=dtype)]


def _gate(
    source: TensorSource, cfg: ModelConfig, prefix: str, dtype: torch.dtype, live: Router | None
) -> Producer:
    """The HF gate of MoE block ``prefix``: its router's expert-embedding matrix E (a Nexus
    router's P(d) computed from that layer's small router tensors alone)."""

    def pieces() -> list[torch.Tensor]:
        router = live if live is not None else _rebuilt_router(source, cfg, prefix)
        with torch.no_grad():
            return [router.expert_embeddings().detach().float().cpu().to(dtype)]

    return pieces


def _rebuilt_router(source: TensorSource, cfg: ModelConfig, prefix: str) -> Router:
    assert cfg.moe is not None
    with torch.device("meta"):
        router = build_router(cfg.moe, cfg.hidden_size)
    router = router.to_empty(device="cpu")
    names = [f"{prefix}.router.{name}" for name in router.state_dict()]
    router.load_state_dict(
        {name.removeprefix(f"{prefix}.router."): source.get(name) for name in names}
    )
    return router.eval()


# --------------------------------------------------------------------------------------------
# import: our tensors from HF ones


class CheckedReader:
    """A Hugging Face checkpoint's tensors, checked against what its config implies.

    Remembers which tensors were checked or read, so that leftovers (weights the config does not
    explain) can be reported. ``config_name`` names the config in messages.
    """

    def __init__(self, source: TensorSource, config_name: str = "config.json") -> None:
        self.source = source
        self.config_name = config_name
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def file_of(self, name: str) -> Path:
        return self.source.file_of(name)

    def mark_used(self, name: str) -> None:
        self._used.add(name)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Check from the header that tensor ``name`` exists with ``shape``; mark it used."""
        config = self.config_name
        if name not in self.source:
            raise NexusError(
                f"{self.source.location}: tensor '{name}' is missing from the weights, but "
                f"{config} implies it (shape {shape}); {config} does not match the weights"
            )
        actual = self.source.shapes[name]
        if actual != shape:
            raise NexusError(
                f"{self.file_of(name)}: tensor '{name}' has shape {actual}, but {config} "
                f"implies {shape}; {config} does not match the weights"
            )
        self._used.add(name)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name``, which the config says has ``shape``."""
        self.check(name, shape)
        return self.source.get(name)

    def check_all_used(self) -> None:
        """Raise NexusError naming the first tensor that nothing read or checked."""
        leftover = sorted(
            n
            for n in self.source.shapes
            if n not in self._used and not n.endswith(_IGNORED_SUFFIXES)
        )
        if leftover:
            raise NexusError(
                f"{self.file_of(leftover[0])}: unexpected tensor '{leftover[0]}' "
                f"({len(leftover)} in all) that {self.config_name} does not account for; "
                f"{self.config_name} does not match the weights"
            )


def import_tensors(rules: list[Rule], reader: CheckedReader, cfg: ModelConfig) -> TensorSource:
    """Check ``reader`` against ``rules`` (every tensor present with its shape, nothing left
    over, the zero tensors zero: only those are read), then our tensors, read on demand."""
    for rule in rules:
        if rule.kind != "zero":
            reader.check(rule.hf, rule.shape)
        elif (rule.required or rule.hf in reader) and reader.get(rule.hf, rule.shape).any():
            raise NexusError(
                f"{reader.file_of(rule.hf)}: tensor '{rule.hf}' is non-zero, but {rule.why}"
            )
    if cfg.tie_embeddings:
        reader.mark_used("lm_head.weight")  # transformers ties it to the embedding anyway
    reader.check_all_used()
    return _OursFromHF(rules, reader.source, cfg)


class _OursFromHF(TensorSource):
    """Our tensors (state-dict order) from a checked HF source: the inverse of each rule."""

    def __init__(self, rules: list[Rule], source: TensorSource, cfg: ModelConfig) -> None:
        self.location = source.location
        self._source = source
        self._rules: dict[str, list[Rule]] = {}
        for rule in rules:
            if rule.kind == "gate":  # an import has a linear router: its weight is the gate
                rule = Rule("copy", rule.hf, rule.shape, ours=f"{rule.ours}.router.weight")
            if rule.kind == "copy":
                self._rules.setdefault(rule.ours, []).append(rule)
        self.shapes = {name: shape for name, (shape, _) in model_shapes(cfg).items()}
        # Each tensor keeps the stored dtype of the (first) HF tensor it comes from.
        self.dtypes = {name: source.dtypes[self._rules[name][0].hf] for name in self.shapes}

    def file_of(self, name: str) -> Path:
        return self._source.file_of(self._rules[name][0].hf)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        rules = self._rules[name]
        if rules[0].index is not None:  # a stack of per-expert tensors
            if index is not None:
                return self._read(rules[index])
            return torch.stack([self._read(rule) for rule in rules])
        tensor = self._read(rules[0])
        return tensor if index is None else tensor[index]

    def _read(self, rule: Rule) -> torch.Tensor:
        tensor = self._source.get(rule.hf)
        return tensor / rule.scale if rule.scale != 1 else tensor  # undo the export's factor


def unfused(source: TensorSource, fmt: Format, cfg: ModelConfig) -> TensorSource:
    """``source`` with transformers 5's fused MoE layout presented under the rules' names.

    transformers 5 keeps a block's experts fused in memory (``mlp.experts.gate_up_proj``
    (E, 2I, H), gate rows first, and ``mlp.experts.down_proj`` (E, H, I)) and names the gate
    ``mlp.gate.weight`` whatever the format; a state dict taken from such a model (a GGUF
    import) arrives in that layout. Sources without it are returned unchanged.
    """
    if not isinstance(fmt, MoEFormat):
        return source
    view = _Unfused(source, fmt, cfg)
    return view if view.aliases else source


class _Unfused(TensorSource):
    def __init__(self, source: TensorSource, fmt: MoEFormat, cfg: ModelConfig) -> None:
        self.location = source.location
        self._source = source
        # presented name -> (stored name, expert index or None, rows of that slice or None)
        self.aliases: dict[str, tuple[str, int | None, slice | None]] = {}
        for i in range(cfg.num_layers):
            if cfg.is_moe_layer(i):
                self._alias_block(source, fmt, i)
        hidden = {stored for stored, _, _ in self.aliases.values()}
        self.shapes = {n: s for n, s in source.shapes.items() if n not in hidden}
        self.dtypes = {n: d for n, d in source.dtypes.items() if n not in hidden}
        for name, (stored, index, rows) in self.aliases.items():
            shape = source.shapes[stored]
            if index is not None:
                shape = shape[1:]
            if rows is not None:
                shape = (len(range(shape[0])[rows]), *shape[1:])
            self.shapes[name], self.dtypes[name] = shape, source.dtypes[stored]

    def _alias_block(self, source: TensorSource, fmt: MoEFormat, layer: int) -> None:
        prefix = f"model.layers.{layer}.{fmt.moe_module}"
        fused = f"model.layers.{layer}.mlp"
        if f"{prefix}.gate.weight" not in source and f"{fused}.gate.weight" in source:
            self.aliases[f"{prefix}.gate.weight"] = (f"{fused}.gate.weight", None, None)
        gate_up, down = f"{fused}.experts.gate_up_proj", f"{fused}.experts.down_proj"
        first = f"{prefix}.experts.0.{fmt.expert_names[0]}.weight"
        if first in source or gate_up not in source or len(source.shapes[gate_up]) != 3:
            return
        num_experts, double_width, _ = source.shapes[gate_up]
        width = double_width // 2
        gate_name, up_name, down_name = fmt.expert_names
        for j in range(num_experts):
            experts = f"{prefix}.experts.{j}"
            self.aliases[f"{experts}.{gate_name}.weight"] = (gate_up, j, slice(0, width))
            self.aliases[f"{experts}.{up_name}.weight"] = (gate_up, j, slice(width, None))
            if down in source:
                self.aliases[f"{experts}.{down_name}.weight"] = (down, j, None)

    def file_of(self, name: str) -> Path:
        stored = self.aliases.get(name, (name, None, None))[0]
        return self._source.file_of(stored)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        if name not in self.aliases:
            return self._source.get(name, index)
        stored, expert, rows = self.aliases[name]
        tensor = self._source.get(stored, expert)
        if rows is not None:
            tensor = tensor[rows]
        return tensor if index is None else tensor[index]
