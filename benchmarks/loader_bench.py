"""Mixture loader throughput: samples/s with 2 DataLoader workers and a domain-weight change
every 50 batches, against the consumption rate of a tiny training step (forward + backward
of the tiny pretrain model on one CPU batch), measured in the same run.

    python benchmarks/loader_bench.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, save


def main() -> None:
    from megadrp.data.manifest import load_manifest
    from megadrp.data.mixture import BatchLayout, MixtureDataset, WeightsTable

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "megadrp", "demo", "--help"], cwd=ROOT, check=True, capture_output=True)
        from megadrp.tools import pipeline

        data = pipeline.prepare_data(tmp, docs_per_domain=500, eval_docs=10)
        m = load_manifest(data)
        prefixes = [d.train for d in m.domains.values()]
        k, seq, mb, batches = len(prefixes), 128, 16, 600
        rng = np.random.default_rng(0)
        table = WeightsTable(np.ones(k) / k)
        table.publish(1, None, final_through=50)
        ds = MixtureDataset(prefixes, seq, BatchLayout(mb, mb, 1, 0), table, seed=0, total_steps=batches)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=4)
        t0 = time.perf_counter()
        for i, b in enumerate(dl, 1):
            if i % 50 == 0:
                table.publish(i + 1, rng.dirichlet(np.ones(k)), final_through=i + 50)
        loader = batches * mb / (time.perf_counter() - t0)

        from transformers import LlamaConfig

        from megadrp.model.llama import MaskedLlama

        cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=32)
        model = MaskedLlama(cfg)
        x = torch.randint(0, m.vocab_size, (mb, seq + 1))

        def step():
            out = model(x[:, :-1], x[:, 1:])
            out.losses.mean().backward()

        step()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        train = 5 * mb / (time.perf_counter() - t0)
    res = {"loader_samples_per_s": round(loader, 1), "tiny_step_samples_per_s": round(train, 1),
           "ratio": round(loader / train, 1), "workers": 2, "seq_len": seq, "batch": mb,
           "weight_change_every_batches": 50}
    save("loader", res, "| what | samples/s |\n|---|---|\n"
         f"| mixture loader, 2 workers, weights change every 50 batches | {res['loader_samples_per_s']:,} |\n"
         f"| tiny training step (5M-param Llama, fwd+bwd, CPU) | {res['tiny_step_samples_per_s']:,} |\n\n"
         f"The loader delivers {res['ratio']}× what the tiny step consumes.")


if __name__ == "__main__":
    main()
