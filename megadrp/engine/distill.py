"""The distillation teacher on its own ZeRO-3 engine (no gradients, no optimizer): frozen, sharded
like the student, gathered layer by layer in each forward. For each micro-batch it gives the
student's forward what the chunked loss needs (model/distill.py): its final hidden states and its
LM head."""
from __future__ import annotations

import torch

from megadrp.engine import zero3
from megadrp.model.distill import Teacher
from megadrp.plan import RunPlan


class TeacherEngine:
    def __init__(self, plan: RunPlan, rank: int) -> None:
        d = plan.cfg.distill
        assert d.teacher is not None
        self.engine = zero3.build_inference_engine(d.teacher, plan, rank)
        self.engine.eval()
        for p in self.engine.module.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature, self.chunk = d.alpha, d.temperature, d.chunk_tokens

    @torch.no_grad()
    def for_batch(self, input_ids: torch.Tensor) -> Teacher:
        hidden = self.engine(input_ids, hidden_only=True)
        return Teacher(hidden, self.engine.module.lm_head, self.alpha, self.temperature, self.chunk)

    def release(self) -> None:
        """Free the teacher's partitions (before the export gathers the student)."""
        zero3.release_engine(self.engine)
        self.engine = None
