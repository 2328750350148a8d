"""The distillation loss (model/distill.py) and its memory terms, each on its own."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config

from megadrp.memory_plan import Dims, ZeroSettings, distill_logits, plan_memory
from megadrp.model.distill import Teacher
from megadrp.model.llama import MaskedLlama, token_losses

pytestmark = pytest.mark.unit


def _pair():
    torch.manual_seed(0)
    student = MaskedLlama(tiny_llama_config())
    student.init_weights()
    teacher = MaskedLlama(tiny_llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2))
    teacher.init_weights()
    return student, teacher


@pytest.mark.parametrize("chunk, temperature", [(7, 1.0), (64, 1.0), (13, 2.0)])
def test_chunked_kl_and_ce_equal_the_whole_logits(chunk, temperature):
    """Forward KL(teacher ‖ student) at temperature T (× T²) and the cross-entropy, chunk by chunk,
    against the same computed on the full [B, T, V] logits: values and the student's gradients."""
    student, teacher = _pair()
    x = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        th = teacher(x[:, :-1], hidden_only=True)
    out = student(x[:, :-1], x[:, 1:], teacher=Teacher(th, teacher.lm_head, 1.0, temperature, chunk))
    (out.kd.mean() + 0.5 * out.losses.mean()).backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    logits = student(x[:, :-1]).float()
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(x[:, :-1]).float() / temperature, -1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(logits / temperature, -1))).sum(-1) * temperature ** 2
    ce = token_losses(logits, x[:, 1:])
    assert torch.allclose(out.kd, kl, atol=1e-5) and torch.allclose(out.losses, ce, atol=1e-5)
    (kl.mean() + 0.5 * ce.mean()).backward()
    for n, p in student.named_parameters():
        if p.grad is not None:
            assert torch.allclose(chunked[n], p.grad, atol=1e-6), n
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained


def test_the_teacher_is_in_the_memory_plan():
    d = Dims(layers=4, hidden=256, heads=4, kv_heads=4, head_dim=64, intermediate=688, vocab=32000)
    t = Dims(layers=8, hidden=512, heads=8, kv_heads=8, head_dim=64, intermediate=1376, vocab=32000)
    z = ZeroSettings(stage=3, param_bytes=2, grad_accum_bytes=4, comm_bytes=4, offload_optimizer=False,
                     offload_param=False, reduce_bucket=1 << 16, prefetch_bucket=1 << 16, max_live=1 << 20,
                     persistence_threshold=0, optimizer="torch")
    alone = plan_memory(d, z, 4, 8, 512, 0)
    with_teacher = plan_memory(d, z, 4, 8, 512, 0, teacher=t, distill_chunk=1024)
    assert with_teacher.terms["teacher_weights"] == 2 * -(-t.parameters() // 4)
    assert with_teacher.terms["teacher_live_parameters"] == 2 * min(t.parameters(), (1 << 20) + (1 << 16))
    # the chunked loss replaces the full logits: 8 × 512 tokens × 32k vocab would be 12 fp32 copies
    assert with_teacher.activations["logits_peak"] == distill_logits(1024, 32000, 4096)
    whole = alone.activations["logits_saved"] + alone.activations["logits_peak"]
    assert with_teacher.activations["logits_saved"] == 0 and with_teacher.activations["logits_peak"] < whole
    assert with_teacher.activations["outside"] - alone.activations["outside"] == 2 * 4096 * 512
