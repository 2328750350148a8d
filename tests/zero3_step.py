"""One masked training step of MaskedLlama on a real DeepSpeed ZeRO-3 engine against the
same step in plain torch on one process (used by tests/test_model.py).

Run it as `python tests/zero3_step.py` (1 rank) or `deepspeed --num_gpus 2 tests/zero3_step.py`,
with `--activation-checkpointing` for the ZeRO-3 model to recompute its blocks in backward
(what the 7B recipes do); rank 0 prints one JSON line: for each parameter, the largest difference between the
ZeRO-3 result and the reference, and how far the reference step moved it.

Why: the gates are folded into o_proj and down_proj with a custom autograd function that
saves the (ZeRO-3 partitioned, released after forward) weight for backward; this checks
that every gradient — weights, log α and the ascended λ's — survives partitioning,
gathering and the reduce-scatter, across ranks.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from megadrp.model.llama import MaskedLlama  # noqa: E402
from megadrp.model.masks import Shape  # noqa: E402
from megadrp.runtime import process_group  # noqa: E402

LR, STEP, SEED, BATCH = 0.1, 3, 5, 4


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[:, :-1], ids[:, 1:], step=STEP, mask_mode="sample", mask_seed=SEED)
    return out.losses.mean() + out.lagrangian


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()
    process_group.start()  # as train.py: discover, watch build locks, init
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    target = Shape(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64)
    torch.manual_seed(0)
    ref = MaskedLlama(cfg, target, ramp_steps=10)
    ref.init_weights()
    with torch.no_grad():  # gates strictly between 0 and 1, λ's non-zero: every gradient path is live
        for p in ref.l0.log_alpha.values():
            p.normal_(1.0, 1.5)
        ref.l0.lambdas.normal_()
    model = copy.deepcopy(ref)
    model.checkpointed_layers = cfg.num_hidden_layers if args.activation_checkpointing else 0
    ids = torch.randint(0, 300, (BATCH, 33), generator=torch.Generator().manual_seed(1))

    loss_of(ref, ids).backward()
    expected = {n: (p - LR * p.grad).detach() for n, p in ref.named_parameters()}

    ds_cfg = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                           config=ds_cfg)
    per = BATCH // world
    engine.backward(loss_of(engine, ids[rank * per:(rank + 1) * per]))
    engine.step()

    before = dict(ref.named_parameters())
    report = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            report[name] = {"diff": (p.detach() - expected[name]).abs().max().item(),
                            "moved": (expected[name] - before[name].detach()).abs().max().item()}
    if rank == 0:
        print(json.dumps({"world": world, "activation_checkpointing": args.activation_checkpointing,
                          "params": report}))


if __name__ == "__main__":
    main()
    process_group.shutdown()
