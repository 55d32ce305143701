"""Data-parallel wrapper, optimizer and learning-rate schedule.

GPUs: megatron-core's DistributedDataParallel and optimizer (bf16 with fp32 main weights,
optionally the distributed optimizer). CPU: the same DDP wrapper with torch's AdamW, because
megatron-core's optimizers allocate on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def wrap_ddp(model, config, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, model)


class CpuAdamW:
    """torch AdamW over megatron DDP's fp32 ``main_grad`` buffers, with TP-aware grad clipping."""

    def __init__(self, model, args):
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() > 1]
        no_decay = [p for p in self.params if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
            ],
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
        )
        self.clip_grad = args.clip_grad

    @property
    def param_groups(self):
        # torch's load_state_dict replaces the list: always hand out the live one (the LR schedule writes it)
        return self.optimizer.param_groups

    def reload_model_params(self):
        """Nothing to refresh: this optimizer steps the model's own parameters (megatron-core's bf16
        optimizers keep fp32 copies, which ``--finetune`` must refresh after loading)."""

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        from megatron.core import parallel_state

        for p in self.params:
            p.grad = p.main_grad
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # Sharded parameters count on every TP rank, replicated ones once; the last pipeline
        # stage's copy of tied embeddings (``shared``) not at all.
        local = sum(
            float(p.grad.float().pow(2).sum()) for p in self.params
            if (getattr(p, "tensor_model_parallel", False) or tp_rank == 0) and not getattr(p, "shared", False)
        )
        total = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
        grad_norm = float(total.sqrt())
        if self.clip_grad and grad_norm > self.clip_grad:
            for p in self.params:
                p.grad.mul_(self.clip_grad / (grad_norm + 1e-6))
        self.optimizer.step()
        return True, grad_norm, None

    def sharded_state_dict(self, model_state: dict, is_loading: bool = False, metadata=None) -> dict:
        """The Adam moments as sharded tensors keyed like the model's parameters (so a checkpoint
        reshards over TP like the weights), and the step count, shared by every parameter."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if is_loading:  # torch's Adam creates its state at the first step; loading needs it now
            for p in params:
                if not self.optimizer.state[p]:
                    self.optimizer.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )
        state = self.optimizer.state_dict()
        state["state"] = {i: dict(s) for i, s in state["state"].items()}  # the live dicts stay as they are
        steps = {float(s.pop("step")) for s in state["state"].values()}
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_state, params))
        state["common_step"] = steps.pop() if steps else 0.0
        return state

    def load_state_dict(self, state):
        """Takes what ``sharded_state_dict`` gave, as dist_checkpointing loaded it."""
        state = dict(state)
        step = state.pop("common_step")
        for s in state["state"].values():
            s["step"] = torch.tensor(step)
        self.optimizer.load_state_dict(state)


def build_optimizer(model, args, device: str):
    if device == "cpu":
        return CpuAdamW(model, args)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [model])


def build_scheduler(optimizer, args):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
