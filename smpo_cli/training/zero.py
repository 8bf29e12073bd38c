"""DeepSpeed ZeRO for full fine-tuning (``train.sharding=zero2`` / ``zero3``, or an accelerate DeepSpeed config).

smpo calls ``deepspeed.initialize`` itself, as it applies FSDP2 itself, so that the same code runs on GPUs (NCCL)
and on CPU processes (gloo), where accelerate refuses DeepSpeed. The loop stays smpo's: the engine runs in
DeepSpeed's unmanaged gradient accumulation (``engine.step()`` is the boundary smpo calls after its
micro-batches), the loss keeps smpo's own scaling (``scale_wrt_gas=False``), and the learning-rate schedule
stays smpo's scheduler on the optimiser's parameter groups.

* ZeRO-2 splits the gradients and the optimiser state across the processes; every process keeps the whole
  trained UNet and the whole frozen reference (weights only).
* ZeRO-3 also splits the trained UNet's weights, and the frozen reference is a second ZeRO-3 engine (no
  optimiser), so each process holds about 1/N of both.

Checkpoints hold full tensors in the format of every other run (weights by name; AdamW state keyed by
parameter name, as FSDP2 writes it), gathered collectively, so a ZeRO run resumes with DDP, FSDP or another
number of processes and the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Any

import torch

from smpo_cli.errors import UsageError

STAGES = {"zero2": 2, "zero3": 3}
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def zero_stage(sharding: str) -> int | None:
    """The ZeRO stage of a ``train.sharding`` value (None: not DeepSpeed)."""
    return STAGES.get(sharding)


def sharding_of_accelerate_deepspeed(env: dict[str, str] | os._Environ | None = None) -> str:
    """``zero2`` / ``zero3`` from the environment ``accelerate launch`` sets for a DeepSpeed config; smpo uses its
    ZeRO stage only (the rest of the DeepSpeed settings come from the recipe). Refuses what it does not run."""
    env = os.environ if env is None else env
    stage = str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    if stage not in ("2", "3"):
        raise UsageError(f"accelerate DeepSpeed config with zero_stage {stage}: smpo runs ZeRO stage 2 or 3",
                         hint="set zero_stage: 2 or 3 (recipes/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)")  # fmt: skip
    for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if str(env.get(key, "none")).lower() not in ("none", ""):
            raise UsageError(f"accelerate DeepSpeed config offloads ({key.removeprefix('ACCELERATE_DEEPSPEED_').lower()}"
                             f"={env[key]}): smpo does not offload yet",
                             hint="set offload_optimizer_device and offload_param_device to none; ZeRO-3 or FSDP "
                             "shards the weights instead (docs/distributed.md)")  # fmt: skip
    return f"zero{stage}"


def require_deepspeed() -> Any:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints and logs to stdout: results only there
            import deepspeed
    except ImportError:
        raise UsageError("train.sharding=zero2/zero3 needs DeepSpeed, which is not installed",
                         hint='pip install "smpo[deepspeed]" (or pip install deepspeed); or use train.sharding=fsdp') from None  # fmt: skip
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    for handler in ds_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return deepspeed


def _config(stage: int, micro_batch: int, grad_accum: int, max_grad_norm: float | None, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        # smpo's loop owns the boundary: every micro-batch's backward accumulates, engine.step() applies
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW / SGD / Adafactor, as the other paths use
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_engine(unet: torch.nn.Module, optimizer, stage: int, micro_batch: int, grad_accum: int,
                max_grad_norm: float | None, world: int):  # fmt: skip
    """The trained UNet and its optimiser as a DeepSpeed engine (the process group is accelerate's)."""
    deepspeed = require_deepspeed()
    # DeepSpeed's own calls of a renamed torch.distributed function: one warning per gather otherwise
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    with contextlib.redirect_stdout(sys.stderr):  # its CPU communication op prints when it is built
        engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, dist_init_required=False,
                                               config=_config(stage, micro_batch, grad_accum, max_grad_norm, world))  # fmt: skip
    # DeepSpeed creates the optimiser state with one zero-gradient step, which counts as Adam's first step; reset
    # the count so that the first real step has the bias correction of step 1, as in every other run
    for state in inner_optimizer(engine).state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
        for key in ADAM_KEYS:
            if key in state:
                state[key].zero_()
    return engine


def init_reference(ref_unet: torch.nn.Module, stage: int, micro_batch: int, world: int) -> torch.nn.Module:
    """The frozen reference: with ZeRO-3 a partitioned engine without optimiser (its module is returned; calling
    it gathers each block's weights in turn); with ZeRO-2 left whole."""
    if stage != 3:
        return ref_unet
    deepspeed = require_deepspeed()
    cfg = _config(3, micro_batch, 1, None, world)
    with contextlib.redirect_stdout(sys.stderr):
        engine, _, _, _ = deepspeed.initialize(model=ref_unet, config=cfg, dist_init_required=False)
    engine.eval()
    return engine.module


def inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def local_fraction(engine) -> float:
    """Share of the trained weights (ZeRO-3) or of the optimiser state (ZeRO-2) this process holds."""
    return _held([p for p in engine.module.parameters() if p.requires_grad], engine)


def reference_fraction(ref_unet: torch.nn.Module) -> float:
    """Share of the frozen reference's weights this process holds (1.0 whole; about 1/N under ZeRO-3)."""
    return _held(list(ref_unet.parameters()), None)


def _held(params: list, engine) -> float:
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    if any(hasattr(p, "ds_tensor") for p in params):
        local = sum(p.ds_tensor.numel() for p in params)
    else:
        groups = (getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or []) if engine else []
        local = sum(g.numel() for g in groups) if groups else full
    return local / max(full, 1)


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def step_applied(engine) -> bool:
    return bool(engine.was_step_applied())


def _named_trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def full_model_state(engine, main: bool) -> dict[str, torch.Tensor]:
    """Every weight as a full fp32 tensor (on CPU) on the main process, {} elsewhere. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    partitioned = any(hasattr(p, "ds_id") for p in engine.module.parameters())
    for name, p in _named_trainable(engine):
        # ZeRO-2 keeps the whole fp32 UNet on every process, updated after each step: no gather needed
        full = safe_get_full_fp32_param(p) if partitioned else p
        if main:
            out[name] = full.detach().to("cpu", copy=True).reshape(tuple(getattr(p, "ds_shape", p.shape)))
    for name, b in engine.module.named_buffers():
        if main:
            out[name] = b.detach().to("cpu", copy=True)
    return out


def full_optimizer_state(engine, main: bool) -> dict[str, Any]:
    """The AdamW state keyed by parameter name (FSDP2's full format) on the main process. Collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = inner_optimizer(engine)
    step = next((s["step"] for s in inner.state.values() if "step" in s), 0)
    step = float(step.item()) if torch.is_tensor(step) else float(step)
    named = _named_trainable(engine)
    state: dict[str, Any] = {}
    for name, p in named:
        entry = {}
        for key in ADAM_KEYS:
            value = safe_get_full_optimizer_state(p, key)
            if value is not None and main:
                entry[key] = value.detach().to("cpu", copy=True).reshape(tuple(getattr(p, "ds_shape", p.shape)))
        if main and entry:
            state[name] = {"step": torch.tensor(step), **entry}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    if len(groups) != 1:
        raise UsageError("train.sharding=zero2/zero3 supports one optimiser parameter group")
    groups[0]["params"] = [n for n, _ in named]
    return {"state": state, "param_groups": groups} if main else {}


def load_optimizer_state(engine, saved: dict[str, Any]) -> None:
    """Put a full AdamW state (keyed by name or by index, from any run) into the partitioned optimiser. Collective."""
    from deepspeed.utils import safe_set_full_optimizer_state

    named = _named_trainable(engine)
    inner = inner_optimizer(engine)
    # ZeRO-3 creates Adam's state at the first step (and lends its flat partitions to the torch optimiser's groups
    # only during a step): create it, zeros, to fill
    flats = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
             or getattr(engine.optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-2
             or [p for g in inner.param_groups for p in g["params"]])  # fmt: skip
    for flat in flats:
        if not inner.state.get(flat):
            inner.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
    # ZeRO-2 links each weight to its slice of the state at the first step; the setters below need that link now
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    by_name = saved.get("state", {})
    if by_name and not any(isinstance(k, str) for k in by_name):  # an unsharded run's state: by index
        by_name = {named[int(k)][0]: v for k, v in by_name.items()}
    step = None
    for name, p in named:
        entry = by_name.get(name)
        if entry is None:
            raise UsageError(f"the checkpoint's optimiser state has no entry for {name}",
                             hint="resume with the recipe the checkpoint was written with (train.lora_rank, model)")  # fmt: skip
        for key in ADAM_KEYS:
            if key in entry:
                safe_set_full_optimizer_state(p, entry[key].to(p.device, torch.float32).flatten(), key)
        step = entry.get("step", step)
    for s in inner.state.values():
        if "step" in s and step is not None:
            s["step"] = torch.as_tensor(step, dtype=torch.float32).clone() if torch.is_tensor(s["step"]) else int(step)
    groups = saved.get("param_groups") or []
    if groups:
        for g in inner.param_groups:
            g.update({k: v for k, v in groups[0].items() if k != "params"})
