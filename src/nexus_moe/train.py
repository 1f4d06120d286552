"""The trainer (docs/design.md §8): AdamW, warmup + cosine, clipping, accumulation, bf16 autocast,
periodic per-domain evaluation, JSONL metrics, atomic checkpoints with exact resume and a NaN guard.

A training run writes one directory::

    out_dir/model/        final model checkpoint (written when the run completes)
    out_dir/checkpoint/   last resumable state: model + optimizer.safetensors + trainer_state.json
    out_dir/metrics.jsonl one JSON object per logged step / evaluation

Under ``torchrun`` every rank trains its own share of each batch (DDP, or FSDP2 with
``parallelism: fsdp``) and only rank 0 logs and writes; checkpoints have the same single-file
format either way, so a run can be resumed with the other parallelism (same number of ranks).
See ``docs/scaling.md``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nexus_moe import calibrate
from nexus_moe import distributed as dist_utils
from nexus_moe.checkpoint import (
    WEIGHTS_FILE,
    load_state_into,
    read_safetensors,
    save_checkpoint,
)
from nexus_moe.config import ModelConfig, check_fields, to_dict
from nexus_moe.data import DomainSampler, TokenShards
from nexus_moe.errors import NexusError
from nexus_moe.evaluate import EvalConfig, evaluate_domains, scores_to_dict
from nexus_moe.io_utils import (
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    atomic_path,
    check_free_space,
    check_output_dir,
    holds_only_own_files,
    read_json,
)
from nexus_moe.losses import language_model_loss
from nexus_moe.model import Transformer

METRICS_FILE = "metrics.jsonl"


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_THRESHOLD = 1 << 30  # 1 GiB


def tune_cpu_allocator() -> bool:
    """Let glibc reuse large freed blocks instead of mapping fresh pages for each one.

    glibc serves allocations above its mmap threshold (adaptive, at most 32 MB) with a fresh
    mapping and unmaps it on free, so every training step's large activations and gradients
    arrive as new pages that fault on first touch. Raising the mmap and trim thresholds to
    1 GiB keeps such blocks in the heap for reuse, which speeds up CPU training (figures:
    BENCHMARKS.md, "CPU allocator tuning"). Freed memory then stays with the process (RSS stays near its peak), which
    suits a training or evaluation process; the CLI calls this for those commands only.

    Skipped (returns False) off glibc, when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves,
    or with ``NEXUS_MOE_MALLOC_TUNING=0``.
    """
    if os.environ.get("NEXUS_MOE_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_THRESHOLD) == 1
    return mmap_ok and trim_ok


# `train_only` patterns that select the feed-forward weights (dense FFN or MoE experts).
FFN_PARAMETERS = ("mlp.",)


# TrainConfig's numeric fields, each with its declared range (config.OPTION_RANGES).
_TRAIN_RANGED = (
    "steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_tokens", "eval_every",
    "checkpoint_every", "lr", "min_lr_ratio", "warmup_frac", "weight_decay", "beta1", "beta2",
    "grad_clip",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (seed pretraining, branching, MoE training)."""

    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (per rank)
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.1  # linear warmup over this share of the steps (docs/design.md §8: 10%)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bf16 autocast (weights and optimizer stay float32)
    seed: int = 0
    domain_weighting: str = "size"  # "size" | "uniform"; see domain_weights for explicit weights
    domain_weights: dict[str, float] = field(default_factory=dict)  # explicit, overrides weighting
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    eval_tokens: int = 32768  # validation tokens per domain at each evaluation
    checkpoint_every: int = 100  # steps between resumable checkpoints; 0: only at the end
    log_every: int = 10
    freeze: list[str] = field(default_factory=list)  # parameter-name substrings kept frozen
    # Parameter-name substrings that are trained; every other parameter stays frozen (empty:
    # train everything not in `freeze`). Branching with ["mlp."] trains only the FFNs, so the
    # experts share the seed's attention, norms and embeddings and compose exactly in an MoE.
    train_only: list[str] = field(default_factory=list)
    # Under torchrun: "ddp" (full replica per rank) or "fsdp" (FSDP2: weights, gradients and
    # optimizer state sharded across ranks, for models that do not fit one device with DDP).
    parallelism: str = "ddp"

    def __post_init__(self) -> None:
        check_fields(self, {name: f"train_{name}" for name in _TRAIN_RANGED})
        bad = {k: w for k, w in self.domain_weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise NexusError(f"train.domain_weights: weights must be >= 0 (got {bad})")
        if self.domain_weighting not in ("size", "uniform"):
            raise NexusError("train.domain_weighting must be 'size' or 'uniform'")
        if self.parallelism not in dist_utils.PARALLELISMS:
            raise NexusError(
                f"train.parallelism must be one of {', '.join(dist_utils.PARALLELISMS)} "
                f"(got {self.parallelism!r})"
            )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warmup, then cosine."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases and 1-D tensors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


# ---------------------------------------------------------------------------------------------
# optimizer state <-> safetensors (by parameter name, so nothing is pickled)


def optimizer_tensors(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{name: {"exp_avg": t, ...}}`` -> flat ``{"name::exp_avg": t}`` on the CPU."""
    return {
        f"{name}::{key}": value.detach().contiguous().cpu()
        for name, fields in state.items()
        for key, value in fields.items()
    }


def optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The reverse of :func:`optimizer_tensors`."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field_name = key.partition("::")
        state.setdefault(name, {})[field_name] = value
    return state


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer that holds the tensors of ``state`` without copying them.

    Used to write the full weights gathered from FSDP shards with the ordinary checkpoint code.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# ---------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on a domain mix from ``shards``; see the module docstring for outputs."""

    def __init__(
        self,
        model: Transformer,
        shards: TokenShards,
        domains: list[str],
        cfg: TrainConfig,
        out_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
        eval_domains: list[str] | None = None,
        device: str | torch.device = "cpu",
        show_progress: bool = True,
        inputs: dict[str, Any] | None = None,
        restart_stale: bool = False,
    ) -> None:
        """``inputs`` describes what shaped the run besides ``cfg`` (init weights hash,
        tokenizer, corpus, domains); a checkpoint is resumed only when they and the model config
        match. A mismatch is an error naming what differs, or with ``restart_stale`` the old
        checkpoint is set aside and training starts afresh."""
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.inputs = {"model": to_dict(model.cfg), **(inputs or {})}
        self.restart_stale = restart_stale
        if cfg.seq_len > model.cfg.max_seq_len:
            raise NexusError(
                f"train.seq_len={cfg.seq_len} exceeds the model's max_seq_len="
                f"{model.cfg.max_seq_len}; lower train.seq_len"
            )
        self.tokenizer_path = tokenizer_path
        self.metadata = dict(metadata or {})
        self.domains = domains
        self.eval_domains = eval_domains or domains
        self.shards = shards
        # Under torchrun the process group is set up here if the caller did not, so every
        # entry point (CLI, recipes, Python) trains data-parallel without further code.
        local_device = dist_utils.init_from_env()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = local_device  # "cuda" means this rank's GPU
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.show_progress = show_progress and self.rank == 0
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        for name, param in self.model.named_parameters():
            frozen = any(pattern in name for pattern in cfg.freeze)
            if cfg.train_only and not any(pattern in name for pattern in cfg.train_only):
                frozen = True
            if frozen:
                param.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise NexusError(
                f"train.freeze={cfg.freeze} freezes every parameter; nothing would be trained — "
                "name fewer parameters"
            )
        # The optimizer is built after wrapping: FSDP swaps the parameters for sharded ones.
        self.wrapped = dist_utils.wrap_model(self.model, cfg.parallelism)
        self.optimizer = build_optimizer(self.model, cfg)
        weighting: str | dict[str, float] = cfg.domain_weights or cfg.domain_weighting
        # Micro-batches of one optimizer step are consecutive sampler batches.
        self.sampler = DomainSampler(
            shards,
            domains,
            cfg.seq_len,
            cfg.batch_size,
            weighting=weighting,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.step = 0
        self.tokens_seen = 0

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def final_dir(self) -> Path:
        return self.out_dir / "model"

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "train_config": to_dict(self.cfg),
            "inputs": self.inputs,
            "world_size": self.world_size,
        }

    def _full_model_and_optimizer(self) -> tuple[Transformer, dict[str, torch.Tensor]] | None:
        """The model to write and its flat optimizer tensors; None on ranks other than 0.

        Call on every rank: under FSDP the shards are gathered to rank 0 (a collective).
        """
        model_state, optim_state = dist_utils.full_state(self.model, self.optimizer)
        if self.rank != 0:
            return None
        if dist_utils.is_sharded(self.model):
            model = model_from_state(self.model.cfg, model_state)
            for full, local in zip(model.moe_layers(), self.model.moe_layers(), strict=True):
                full.domain_stats = local.domain_stats
            if getattr(self.model, "peer_state", None) is not None:  # a peer router's inputs
                model.peer_state = self.model.peer_state  # (routers/peers.py), as unsharded
        else:
            model = self.model
        return model, optimizer_tensors(optim_state)

    def save(self) -> None:
        """Write the resumable checkpoint atomically. Call on every rank: rank 0 writes and the
        others wait for it, so that whatever comes next (a resume) finds it complete."""
        self._write_checkpoint(self._full_model_and_optimizer())
        dist_utils.barrier()

    def _write_checkpoint(self, full: tuple[Transformer, dict[str, torch.Tensor]] | None) -> None:
        if full is None:  # not rank 0
            return
        model, optim_tensors = full
        rng = {"torch_rng": torch.get_rng_state()}
        save_checkpoint(
            self.checkpoint_dir,
            model,
            self.tokenizer_path,
            metadata=self.metadata,
            extra_files={
                OPTIMIZER_FILE: optim_tensors or {},
                STATE_FILE: self._trainer_state(),
                RNG_FILE: rng,
            },
        )

    def maybe_resume(self) -> bool:
        """Resume from ``out_dir/checkpoint`` when it exists; True if resumed."""
        ckpt = self.checkpoint_dir
        if not (ckpt / STATE_FILE).is_file():
            self._trim_metrics()  # rows of a start killed before its first checkpoint
            return False
        state = read_json(ckpt / STATE_FILE)
        saved_inputs = state.get("inputs")
        if isinstance(saved_inputs, dict) and saved_inputs != self.inputs:
            differ = sorted(
                k
                for k in {**saved_inputs, **self.inputs}
                if saved_inputs.get(k) != self.inputs.get(k)
            )
            if self.restart_stale:
                self._clear_metrics()
                return False
            raise NexusError(
                f"{ckpt}: holds a run made from a different {', '.join(differ)}; it cannot be "
                "resumed with these inputs — pass --overwrite to train afresh, or choose another "
                "--out"
            )
        if state.get("world_size", 1) != self.world_size:
            raise NexusError(
                f"{ckpt}: saved with world size {state.get('world_size')}, now {self.world_size}; "
                "resume with the same number of processes"
            )
        # The parallelism may change: the checkpoint holds full tensors either way.
        saved_cfg = {k: v for k, v in state.get("train_config", {}).items() if k != "parallelism"}
        current_cfg = {k: v for k, v in to_dict(self.cfg).items() if k != "parallelism"}
        if saved_cfg != current_cfg:
            if self.restart_stale:
                self._clear_metrics()
                return False
            differ = sorted(
                k for k in {**saved_cfg, **current_cfg} if saved_cfg.get(k) != current_cfg.get(k)
            )
            raise NexusError(
                f"{ckpt / STATE_FILE}: the training config differs from the one being resumed "
                f"(train.{', train.'.join(differ)}); pass --overwrite to train afresh, use a new "
                "output directory or restore the original config"
            )
        opt_path = ckpt / OPTIMIZER_FILE
        optim = optimizer_state(read_safetensors(opt_path)) if opt_path.is_file() else {}
        if dist_utils.is_sharded(self.model):
            weights = read_safetensors(ckpt / WEIGHTS_FILE)  # full tensors; each rank keeps a shard
            if self.model.cfg.tie_embeddings:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
            dist_utils.load_full_model_state(self.model, weights)
        else:
            weights = read_safetensors(ckpt / WEIGHTS_FILE, str(self.device))
            load_state_into(self.model, weights, ckpt / WEIGHTS_FILE)  # names a bad tensor
        dist_utils.load_full_optimizer_state(self.model, self.optimizer, optim)
        torch.set_rng_state(read_safetensors(ckpt / RNG_FILE)["torch_rng"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self._trim_metrics()
        return True

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    def _clear_metrics(self) -> None:
        """A run restarted afresh: the rows and the final model of the set-aside run go (the
        model is not left to pass for this run's result if it is interrupted)."""
        if self.rank != 0:
            return
        if self.metrics_path.is_file():
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("")
        if self.final_dir.is_dir() and holds_only_own_files(self.final_dir):
            shutil.rmtree(self.final_dir)

    def _trim_metrics(self) -> None:
        """After a resume at ``self.step``, drop rows logged after that checkpoint was written
        (they are logged again), so that ``metrics.jsonl`` has each row once."""
        if self.rank != 0 or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short by the interruption
            step = row.get("step", 0) if isinstance(row, dict) else 0
            # The final evaluation is logged before the final checkpoint: it is logged again.
            final_eval = "eval" in row and step == self.cfg.steps == self.step
            if step <= self.step and not final_eval:
                keep.append(line)
        if len(keep) != len(lines):
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))

    def preflight(self) -> None:
        """Check the validation data, output folders and free space before any step runs."""
        for domain in self.eval_domains:  # evaluated at the end: an empty split would fail then
            if self.shards.num_tokens(domain, "validation") < 2:
                raise NexusError(
                    f"{self.shards.data_dir}: domain {domain!r} has an empty validation split, "
                    "so the run could not be evaluated; rebuild the corpus with more text or a "
                    "larger val_fraction, or leave the domain out"
                )
        if self.rank != 0:
            return
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NexusError(
                f"{self.out_dir}: exists and is a file, not a folder; choose a folder for --out"
            )
        for folder in (self.checkpoint_dir, self.final_dir):
            check_output_dir(folder)
        # Checkpoint (weights + two AdamW moments) and final model, each briefly twice on disk.
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        check_free_space(self.out_dir, 8 * weight_bytes)

    # -- training -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _routing_stats(self) -> dict[str, Any]:
        layers = self.model.moe_layers()
        if not layers:
            return {}
        loads = []
        for layer in layers:
            counts = dist_utils.sum_across_ranks(layer.tokens_per_expert)  # all ranks' tokens
            loads.append((counts / counts.sum().clamp_min(1)).tolist())
            layer.tokens_per_expert.zero_()
        return {"expert_load": loads}

    def evaluate(self) -> dict[str, Any]:
        eval_cfg = EvalConfig(self.cfg.seq_len, self.cfg.batch_size, self.cfg.eval_tokens)
        scores = evaluate_domains(
            self.model,
            self.shards,
            self.eval_domains,
            eval_cfg,
            device=self.device,
            autocast_dtype=torch.bfloat16 if self.cfg.bf16 else None,
        )
        return scores_to_dict(scores)

    def train(self, stop_at_step: int | None = None) -> Path | None:
        """Run (or finish) training; returns the final model dir, or None if stopped early.

        ``stop_at_step`` ends the run after that many steps as if interrupted (for tests and
        time-boxed runs); the resumable checkpoint is written first.
        """
        cfg = self.cfg
        self.preflight()
        self.maybe_resume()
        self.model.train()
        end = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)
        progress = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.show_progress,
            desc="train",
            dynamic_ncols=True,
        )
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world_size
        window_start, window_tokens = time.perf_counter(), 0
        last_good = self.step
        while self.step < end:
            lr = lr_at(self.step, cfg)
            lm_total, aux_total, grad_norm, out = self._optimizer_step(lr, last_good)
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            # Each rank's loss is the mean over its own tokens; with equal per-rank batches their
            # mean is the global-batch loss (and DDP/FSDP average the gradients the same way).
            lm_total = dist_utils.mean_across_ranks(lm_total)
            progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                tps = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                self._log_step(lr, lm_total, aux_total, grad_norm, out, tps)
                progress.set_postfix(loss=f"{lm_total:.3f}", tok_s=f"{tps:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._log({"step": self.step, "eval": self.evaluate()})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
                last_good = self.step
        progress.close()
        if self.step < cfg.steps:  # interrupted on purpose
            self.save()
            return None
        return self._finish()

    def _optimizer_step(self, lr: float, last_good: int) -> tuple[float, float, torch.Tensor, Any]:
        """One optimizer step over ``grad_accum`` micro-batches at learning rate ``lr``.

        Returns this rank's mean LM and auxiliary losses, the global gradient norm and the last
        micro-batch's model output. A non-finite loss or gradient stops the run, naming the last
        good checkpoint (step ``last_good``).
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lm_total, aux_total = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            inputs, targets, _ = self.sampler.next_batch()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with dist_utils.no_sync_unless(self.wrapped, micro == cfg.grad_accum - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = self.wrapped(inputs)
                    lm_loss = language_model_loss(out.logits, targets)
                    loss = (lm_loss + out.aux_loss) / cfg.grad_accum
                # Decided together, so that every rank stops at the same point.
                if not dist_utils.all_ranks(bool(torch.isfinite(loss))):
                    self._nan_error(lm_loss.detach(), out.aux_loss.detach(), last_good)
                loss.backward()
            lm_total += lm_loss.item() / cfg.grad_accum
            aux_total += out.aux_loss.item() / cfg.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Gradients are already reduced across ranks here, so the norm is the global one.
        grad_norm = dist_utils.clip_grad_norm(params, cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self._nan_error(torch.tensor(lm_total), torch.tensor(float("nan")), last_good)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lm_total, aux_total, grad_norm, out

    def _log_step(
        self,
        lr: float,
        lm_loss: float,
        aux_loss: float,
        grad_norm: torch.Tensor,
        out: Any,
        tokens_per_s: float,
    ) -> None:
        """Write the metrics record of the step just taken (losses averaged over ranks)."""
        record = {
            "step": self.step,
            "loss": lm_loss,
            "aux_loss": dist_utils.mean_across_ranks(aux_loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            **self._routing_stats(),
        }
        if out.routing:
            # Computed per rank on its local tokens (see docs/scaling.md), then averaged.
            record["load_balance_loss"] = dist_utils.mean_across_ranks(
                float(torch.stack([r.load_balance_loss.detach() for r in out.routing]).mean())
            )
        self._log(record)

    def _finish(self) -> Path:
        """Final evaluation, the last resumable checkpoint and the final model directory."""
        scores = self.evaluate()
        self._log({"step": self.step, "eval": scores})
        full = self._full_model_and_optimizer()  # every rank: a collective under FSDP
        if full is not None:
            # An MoE with a calibrated router: describe the trained hidden states, against
            # which experts added later are placed (docs/design.md §5.6).
            calibrate.refresh_statistics(full[0], self.shards, device=self.device)
            self._write_checkpoint(full)
            save_checkpoint(
                self.final_dir,
                full[0],
                self.tokenizer_path,
                metadata={
                    **self.metadata,
                    "steps": self.step,
                    "tokens": self.tokens_seen,
                    "eval": scores,
                    **({"train_only": list(self.cfg.train_only)} if self.cfg.train_only else {}),
                },
            )
        dist_utils.barrier()
        return self.final_dir

    def _nan_error(self, lm_loss: torch.Tensor, aux_loss: torch.Tensor, last_good: int) -> None:
        where = (
            f"the last good checkpoint (step {last_good}) is kept in {self.checkpoint_dir}"
            if (self.checkpoint_dir / STATE_FILE).is_file()
            else "no checkpoint had been written yet"
        )
        raise NexusError(
            f"non-finite loss at step {self.step + 1} (lm loss {float(lm_loss):.4g}, aux loss "
            f"{float(aux_loss):.4g}); {where}. Lower train.lr, enable train.grad_clip, or check "
            "the data; nothing was written for the failing step."
        )
