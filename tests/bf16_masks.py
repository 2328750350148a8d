"""Final masks under bf16 ZeRO-3 come from the fp32 master log α (used by tests/test_model.py).

Run as `python tests/bf16_masks.py` (1 rank) or `deepspeed --num_gpus 2 tests/bf16_masks.py`.
Sets the fp32 master of one intermediate-mask row to 3.000, 3.001, 3.002, 3.003, … (all
equal to 3.0 in bf16), reads the masks back the way the exporter does (`export.final_masks`),
the way the trainer's last evaluation does (a 'final' forward of the masks) and the way the
consolidated 16-bit state dict would, and prints one JSON line on rank 0: which channels
each path keeps.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_set_full_fp32_param  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from megadrp.engine.export import final_masks  # noqa: E402
from megadrp.engine.zero3 import fp32_master  # noqa: E402
from megadrp.model.llama import MaskedLlama  # noqa: E402
from megadrp.model.masks import Shape, deterministic_z  # noqa: E402
from megadrp.runtime import process_group  # noqa: E402


def main() -> None:
    process_group.start()  # as train.py: discover, watch build locks, init
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
    target = Shape(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=4)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True}
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = MaskedLlama(cfg, target, ramp_steps=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                           config=ds_cfg)
    la = engine.module.l0.log_alpha["intermediate"]
    wanted = (3.0 + 0.001 * torch.arange(8, dtype=torch.float32)).repeat(2, 1)  # rising: the last 4 win
    safe_set_full_fp32_param(la, wanted)
    fp32 = fp32_master({"intermediate": la})["intermediate"]
    l0 = engine.module.l0
    with deepspeed.zero.GatheredParameters(list(l0.parameters())), torch.no_grad():
        before = l0(1, "final")[0]["intermediate"].float()  # no master read yet: the module's bf16 values
    exported = final_masks(l0)["intermediate"]  # what export() folds into the weights
    with deepspeed.zero.GatheredParameters(list(l0.parameters())), torch.no_grad():
        evaluated = l0(1, "final")[0]["intermediate"].float()  # what the last evaluation scores
    sd = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        bf16 = sd["l0.log_alpha.intermediate"].float()

        def nonzero(z: torch.Tensor) -> list[list[int]]:
            return [sorted(torch.nonzero(row).flatten().tolist()) for row in z]

        def kept(v: torch.Tensor) -> list[list[int]]:
            return nonzero(deterministic_z(v, 4))

        print(json.dumps({"world": world, "module_dtype": str(sd["l0.log_alpha.intermediate"].dtype),
                          "fp32_exact": bool(torch.equal(fp32, wanted)), "bf16_distinct": len(set(bf16[0].tolist())),
                          "kept_fp32": kept(fp32), "kept_bf16": kept(bf16), "kept_export": nonzero(exported),
                          "kept_eval_before": nonzero(before), "kept_eval": nonzero(evaluated)}))


if __name__ == "__main__":
    main()
    process_group.shutdown()
