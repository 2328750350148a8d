"""Device-strict code, checked on a machine without a GPU.

A GPU run fails at step 0 when one tensor that meets the model, the masks or a collective is
made on the host: NCCL has no backend for CPU tensors, and a CPU tensor times a CUDA tensor
raises. The CPU suite cannot see that, because there every device is the host. Here the
model runs on the `meta` device (shapes only, no data), where a host tensor meeting a device
tensor raises just as it would on a GPU; and the engine's collectives run through a process
group that serves only the `meta` device type, as an NCCL group serves only CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama_config

from megadrp.model.llama import MaskedLlama, shape_of
from megadrp.model.masks import Shape

pytestmark = pytest.mark.unit

META = torch.device("meta")
# source: 3 layers, 64 d, 4 heads in 2 kv groups, 128 intermediate (tiny_llama_config)
TARGETS = {
    "every set active": Shape(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64),
    "keep all layers": Shape(layers=3, hidden=48, heads=2, kv_heads=1, intermediate=64),
    "keep all heads": Shape(layers=2, hidden=48, heads=4, kv_heads=2, intermediate=64),
    "hidden only": Shape(layers=3, hidden=48, heads=4, kv_heads=2, intermediate=128),
    "target = source": Shape(layers=3, hidden=64, heads=4, kv_heads=2, intermediate=128),
}


def _meta_model(target: Shape | None, checkpointing: bool | int = False) -> MaskedLlama:
    with META:
        return MaskedLlama(tiny_llama_config(), target, ramp_steps=10, activation_checkpointing=checkpointing)


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("mode", ["sample", "expected", "final"])
def test_masked_forward_backward_on_a_device_that_is_not_the_host(name, mode):
    model = _meta_model(TARGETS[name])
    model.train(mode == "sample")
    x = torch.zeros(2, 17, dtype=torch.long, device=META)
    out = model(x[:, :-1], x[:, 1:], step=3, mask_mode=mode, mask_seed=1, mask_draw=0)
    assert out.losses.device == META and out.lagrangian.device == META
    if mode != "sample":  # an evaluation's expected shape stays on the device too (read once, after the reduce)
        assert out.expected_shape.device == META and out.expected_shape.shape == (6,)
    loss = out.losses.mean() + out.lagrangian
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device == META for g in grads)
    if mode == "sample" and model.l0.active:
        assert all(p.grad is not None for p in model.l0.log_alpha.values())


def _family_config(name: str):
    """The Qwen3 and GPT-NeoX blocks (per-head q/k norms; LayerNorm with bias, fused q/k/v, partial
    rotary, parallel residual): tiny configs of transformers' own classes."""
    from transformers import GPTNeoXConfig, Qwen3Config

    if name == "qwen3":
        return Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64)
    return GPTNeoXConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25)


@pytest.mark.parametrize("family,target", [
    ("qwen3", Shape(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64)),
    ("gpt_neox", Shape(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=64)),
])
@pytest.mark.parametrize("mode", ["sample", "final"])
def test_every_family_runs_on_a_device_that_is_not_the_host(family, target, mode):
    with META:
        model = MaskedLlama(_family_config(family), target, ramp_steps=10)
    model.train(mode == "sample")
    x = torch.zeros(2, 17, dtype=torch.long, device=META)
    out = model(x[:, :-1], x[:, 1:], step=3, mask_mode=mode, mask_seed=1, mask_draw=0)
    assert out.losses.device == META and out.lagrangian.device == META
    (out.losses.mean() + out.lagrangian).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device == META for g in grads)


@pytest.mark.parametrize("checkpointing", [True, 2])
def test_checkpointed_forward_backward_on_the_device(checkpointing):
    model = _meta_model(TARGETS["keep all layers"], checkpointing).train()
    x = torch.zeros(2, 9, dtype=torch.long, device=META)
    out = model(x[:, :-1], x[:, 1:], step=1, mask_mode="sample")
    (out.losses.mean() + out.lagrangian).backward()
    assert model.model.embed_tokens.weight.grad.device == META


def test_unmasked_forward_backward_on_the_device():
    model = _meta_model(None).train()
    x = torch.zeros(1, 9, dtype=torch.long, device=META)
    out = model(x[:, :-1], x[:, 1:])
    assert out.lagrangian is None and out.expected_shape is None
    out.losses.mean().backward()
    assert model.lm_head.weight.grad.device == META


def test_expected_shape_tensor_matches_the_host_numbers():
    """The device-side shape (one float64 tensor) holds what the metrics report, in SHAPE_STATS order."""
    from megadrp.model.masks import L0Masks

    src = shape_of(tiny_llama_config())
    m = L0Masks(src, TARGETS["every set active"], ramp_steps=10, head_dim=16)
    probs = {k: v.detach() for k, v in m.probs().items()}
    stats = m.expected_shape(probs)
    assert stats.dtype == torch.float64 and stats.shape == (6,)
    layers, hidden, heads, kv, inter, sparsity = stats.tolist()
    assert layers == pytest.approx(float(probs["layer"].double().sum()))
    assert kv == pytest.approx(float(probs["head"].double().sum(-1).mean())) and heads == pytest.approx(2 * kv)
    assert 0.0 <= sparsity < 0.01  # every unit starts on: nearly nothing removed in expectation


# ---- collectives through a group that serves only the device's type ----------------------
@pytest.fixture
def meta_only_group():
    """A process group whose backend serves only `meta` tensors, as NCCL serves only CUDA:
    a collective on a host tensor raises "No backend type associated with device type cpu".
    torch's FakeProcessGroup does the (no-op) communication; world size 2 so that nothing is
    skipped as a one-rank shortcut."""
    from torch._C._distributed_c10d import FakeProcessGroup

    def create(common_opts, backend_opts):
        return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

    if "megadrp_meta" not in dist.Backend.backend_list:
        dist.Backend.register_backend("megadrp_meta", create, extended_api=True, devices=["meta"])
    if dist.is_initialized():  # another module's one-rank gloo group: it re-initialises where it needs one
        dist.destroy_process_group()
    dist.init_process_group("megadrp_meta", store=dist.HashStore(), rank=0, world_size=2)
    try:
        with pytest.raises(RuntimeError, match="device type cpu"):
            dist.all_reduce(torch.zeros(1))  # the harness itself: a host tensor is refused
        yield
    finally:
        dist.destroy_process_group()


def test_step_reduction_and_stop_flag_stay_on_the_device(meta_only_group):
    from megadrp.engine.collectives import StepSums, any_rank

    sums = StepSums(k=3, device=META)
    sums.add(torch.zeros(2, 5, device=META), torch.tensor([0, 2], device=META), torch.zeros((), device=META),
             kd=torch.zeros(2, 5, device=META))  # a distillation step's per-token KL too
    reduced = sums.reduce(stop_signal=10)
    assert reduced.device == META and reduced.shape == (2 * 3 + 3,)
    flag = any_rank(10, META)
    assert flag.device == META


def test_evaluation_sums_stay_on_the_device(meta_only_group):
    """The evaluator's forwards and its all-reduce, with the masked model on the device."""
    from megadrp.engine.evaluator import Evaluator

    class Windows:
        n = 3

        def __getitem__(self, i):
            import numpy as np

            return np.zeros(9, dtype=np.int64)

    model = _meta_model(TARGETS["keep all heads"])
    model.device = META  # what a DeepSpeed engine exposes
    ev = Evaluator([Windows(), Windows()], seq_len=8, micro_batch=2, rank=0, world=2)
    sums, out = ev.reduced_sums(model, step=2, mask_mode="expected")
    # per domain: loss sum, tokens, KL sum, Σ window mean, Σ its square, windows
    assert sums.device == META and sums.shape == (2, 6)
    assert out.expected_shape.device == META
