"""One-shot importance (megadrp/model/importance.py): the scores by hand on a real model, the
domain-robust choice, exact target counts, and the warm start's log α."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from megadrp.model.importance import Recorder, Scores, combine, keep_masks, warm_log_alpha
from megadrp.model.llama import MaskedLlama, shape_of
from megadrp.model.masks import Shape

pytestmark = pytest.mark.unit
CFG = LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, max_position_embeddings=32)


def _model_with_a_one_domain_channel() -> MaskedLlama:
    """Tokens 0–9 are domain A's, 10–19 domain B's. Every token has the same components on
    hidden dims 2–7 plus one of its domain (dim 0: A, dim 1: B). MLP channel 0 reads dim 0 only:
    active on A, silent on B; channels 1–3 read the shared dims, a little more each."""
    torch.manual_seed(0)
    m = MaskedLlama(CFG)
    m.init_weights()
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        e.zero_()
        e[:, 2:] = 1.0
        e[:10, 0] = 3.0
        e[10:, 1] = 3.0
        mlp = m.model.layers[0].mlp
        mlp.gate_proj.weight.zero_()
        mlp.up_proj.weight.zero_()
        mlp.gate_proj.weight[0, 0] = mlp.up_proj.weight[0, 0] = 0.72
        for c, w in ((1, 0.30), (2, 0.35), (3, 0.40)):
            mlp.gate_proj.weight[c, 2:] = mlp.up_proj.weight[c, 2:] = w
    return m


def _domain_means(model, lows=(0, 10)) -> list[dict[str, torch.Tensor]]:
    out = []
    for lo in lows:
        scores = Scores.zeros(shape_of(CFG), torch.device("cpu"))
        rec = Recorder(model, scores, CFG.num_key_value_heads)
        rec.real = 4
        x = torch.randint(lo, lo + 10, (4, 17), generator=torch.Generator().manual_seed(lo))
        with torch.no_grad():
            model(x[:, :-1], x[:, 1:])
        rec.detach()
        scores.windows += 4
        out.append(scores.mean())
    return out


def test_worst_keeps_a_channel_one_domain_needs_and_mean_cuts_it():
    per = _domain_means(_model_with_a_one_domain_channel())
    assert per[1]["intermediate"][0, 0] < 1e-3 < per[0]["intermediate"][0, 0]  # channel 0 lives on A only
    target = Shape(layers=1, hidden=8, heads=2, kv_heads=2, intermediate=3)
    mean = keep_masks(combine(per, "mean"), shape_of(CFG), target)["intermediate"][0]
    worst = keep_masks(combine(per, "worst"), shape_of(CFG), target)["intermediate"][0]
    assert mean.tolist() == [0.0, 1.0, 1.0, 1.0]  # on average over domains it is the least used
    assert worst.tolist() == [1.0, 0.0, 1.0, 1.0]  # but A needs it more than anything needs channel 1


def test_scores_by_hand():
    """The head and channel scores are the recorded activations' L2 norm over the sequence,
    summed over the batch; Block Influence is 1 − cos(block input, block output)."""
    m = _model_with_a_one_domain_channel()
    seen = {}
    block = m.model.layers[0]
    hooks = [block.mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__("act", a[0])),
             block.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__("heads", a[0])),
             block.register_forward_hook(lambda mod, a, out: seen.update(h_in=a[0], h_out=out))]
    scores = Scores.zeros(shape_of(CFG), torch.device("cpu"))
    rec = Recorder(m, scores, 2)
    rec.real = 3  # the fourth row pads a shard: not counted
    x = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m(x[:, :-1], x[:, 1:])
    for h in hooks:
        h.remove()
    act = seen["act"][:3].double()
    assert torch.allclose(scores.intermediate[0], act.pow(2).sum(1).sqrt().sum(0))
    heads = seen["heads"][:3].double().view(3, 8, 2, 4).norm(dim=-1)  # per token and head
    assert torch.allclose(scores.head[0], heads.pow(2).sum(1).sqrt().sum(0))  # one query head a group here
    cos = torch.nn.functional.cosine_similarity(seen["h_in"][:3].double(), seen["h_out"][:3].double(), dim=-1)
    assert torch.allclose(scores.layer[0], (1 - cos).mean(1).sum())


def test_masks_keep_exactly_the_target_uniformly_and_ties_go_low():
    source = Shape(layers=4, hidden=6, heads=4, kv_heads=2, intermediate=5)
    target = Shape(layers=2, hidden=3, heads=2, kv_heads=1, intermediate=2)
    score = {"layer": torch.tensor([0.1, 0.9, 0.5, 0.9]), "hidden": torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 0.5]),
             "head": torch.rand(4, 2, generator=torch.Generator().manual_seed(0)),
             "intermediate": torch.rand(4, 5, generator=torch.Generator().manual_seed(1))}
    z = keep_masks(score, source, target)
    assert z["layer"].tolist() == [0, 1, 0, 1] and z["hidden"].tolist() == [1, 1, 0, 0, 1, 0]
    assert (z["head"].sum(-1) == 1).all() and (z["intermediate"].sum(-1) == 2).all()
    assert keep_masks(score, source, Shape(layers=2, hidden=6, heads=4, kv_heads=2, intermediate=5)).keys() == {"layer"}


def test_warm_log_alpha():
    la = warm_log_alpha({"hidden": torch.tensor([1.0, 0.0, 1.0])}, 4.6, 2.0)
    assert la["hidden"].tolist() == pytest.approx([4.6, 2.6, 4.6])
