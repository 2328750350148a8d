"""Model families (SPEC §2): Llama 2 / 3 / 3.1, Mistral, Qwen2 / Qwen2.5, Qwen3.

Each family's tiny model is built with transformers' own config and model classes, with
what the family has (GQA, llama3 rope scaling, q/k/v biases, tied embeddings, a sliding
window that covers the sequence) and random biases and norm weights, so a bias or a norm
that went missing in loading, pruning or export changes the logits.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from megadrp.config import load_config
from megadrp.errors import CheckpointError, ConfigError, FamilyError, TargetShapeError
from megadrp.model.families import check_config, check_sliding_window
from megadrp.model.hf_io import export_hf, load_hf_config, load_weights
from megadrp.model.llama import MaskedLlama, count_parameters, head_dim_of, shape_of
from megadrp.model.masks import SETS, L0Masks, Shape, check_target
from megadrp.model.prune import prune_state_dict

VOCAB = 300
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name → (config class, its arguments, model class): one row per family variant the issue names
FAMILIES = {
    "llama2": (LlamaConfig, dict(num_key_value_heads=4), "LlamaForCausalLM"),  # MHA, rope θ 1e4
    "llama3.1": (LlamaConfig, dict(rope_parameters=LLAMA3_ROPE), "LlamaForCausalLM"),  # GQA, llama3 rope
    "mistral": (MistralConfig, dict(sliding_window=64, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                "MistralForCausalLM"),  # v0.1: a window at least as long as the sequence
    "qwen2-tied": (Qwen2Config, dict(tie_word_embeddings=True), "Qwen2ForCausalLM"),  # 0.5B/1.5B: tied
    # Qwen2.5's long-context setting (yarn) and windows on layers 1, 2 (layer_types mixed)
    "qwen2.5-window": (Qwen2Config, dict(use_sliding_window=True, sliding_window=64, max_window_layers=1,
                                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                          "original_max_position_embeddings": 16}),
                       "Qwen2ForCausalLM"),
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim that is not hidden / heads, tied (0.6B–4B)
    "qwen3": (Qwen3Config, dict(head_dim=24, tie_word_embeddings=True), "Qwen3ForCausalLM"),
}
COMBOS = [c for r in range(1, 5) for c in itertools.combinations(SETS, r)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster when the cores are
    shared (a 2-thread pool spinning on busy cores made each forward ~100× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _target(src: Shape) -> Shape:
    """Prunes every dimension: half the key/value groups (whole groups of query heads) and
    hidden 64 → 40, while head_dim (16; Qwen3's 24) stays."""
    kv = src.kv_heads // 2
    return Shape(layers=2, hidden=40, heads=kv * (src.heads // src.kv_heads), kv_heads=kv, intermediate=48)
def _source(tmp_path, name: str, vocab: int = VOCAB):
    """A random checkpoint of the family saved by transformers, loaded back by megadrp."""
    cls, kw, model_cls = FAMILIES[name]
    torch.manual_seed(0)
    return _saved_and_loaded(getattr(transformers, model_cls)(cls(**{**BASE, "vocab_size": vocab, **kw})), tmp_path,
                             name)


def _saved_and_loaded(hf, tmp_path, name: str):
    """`hf` with random biases and norm weights (HF initialises them to 0 and 1: make both
    matter), saved by transformers and loaded back by megadrp: (hf, ours, our config)."""
    hf.eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / name)
    cfg = load_hf_config(tmp_path / name, seq_len=48)
    ours = MaskedLlama(cfg).eval()
    load_weights(ours, tmp_path / name)
    return hf, ours, cfg


def _masked_and_pruned(ours, sd: dict, cfg, target: Shape, combo, ids, **masks):
    """Random final masks on `combo`'s sets (seeded by the combination): the masked model's logits
    on `ids`, the masks, and the pruned state dict and config they give."""
    ours.l0 = L0Masks(shape_of(cfg), target, 10, head_dim_of(cfg), sets=combo, **masks)
    torch.manual_seed(len(combo))
    with torch.no_grad():
        for p in ours.l0.log_alpha.values():
            p.normal_(1.0, 2.0)
        masked = ours(ids, mask_mode="final")
        z, _, _ = ours.l0(0, "final")
    return (masked, z, *prune_state_dict(sd, cfg, z))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unmasked_equals_transformers(tmp_path, name):
    hf, ours, cfg = _source(tmp_path, name, vocab=65600 if name == "llama3.1" else VOCAB)  # 128k-style: > uint16
    assert type(hf).__name__ == FAMILIES[name][2] and type(cfg).__name__ == FAMILIES[name][0].__name__
    if name.startswith("qwen2"):
        assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"{name}: max |logit diff| unmasked = {diff:.2e}")
    assert diff <= 1e-4
    assert count_parameters(cfg) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_equals_masked_model_for_every_set_combination(tmp_path, name):
    """All 15 combinations of mask sets: the export in the family's own class gives the
    masked model's 'final' logits. The full combination goes through disk and
    AutoModelForCausalLM; the others load the pruned state dict into the same class in
    memory (what export_hf does before saving), which keeps the test short."""
    _, ours, cfg = _source(tmp_path, name)
    cls = getattr(transformers, FAMILIES[name][2])
    sd = {k: v for k, v in ours.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 24))
    target = _target(shape_of(cfg))
    worst = 0.0
    for combo in COMBOS:
        masked, z, small, small_cfg = _masked_and_pruned(ours, sd, cfg, target, combo, ids)
        assert sorted(ours.l0.active) == sorted(combo)
        want = {k: getattr(target if m in combo else shape_of(cfg), k)
                for m, k in (("layer", "layers"), ("hidden", "hidden"), ("head", "heads"), ("head", "kv_heads"),
                             ("intermediate", "intermediate"))}
        if combo == SETS:
            exported = AutoModelForCausalLM.from_pretrained(export_hf(small, small_cfg, tmp_path / "hf")).eval()
            saved = json.loads((tmp_path / "hf" / "config.json").read_text())
            assert saved["architectures"] == [cls.__name__] and saved["head_dim"] == head_dim_of(cfg)
            assert saved["tie_word_embeddings"] == bool(getattr(cfg, "tie_word_embeddings", False))
            if name == "qwen2.5-window":  # the kept layers attend as they did
                kept = torch.nonzero(z["layer"]).flatten().tolist()
                assert saved["layer_types"] == [cfg.layer_types[i] for i in kept]
        else:
            exported = cls(small_cfg).eval()
            missing, unexpected = exported.load_state_dict(small, strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}
        assert type(exported) is cls and shape_of(exported.config).as_dict() == want, combo
        hd = head_dim_of(cfg)
        assert head_dim_of(exported.config) == hd and exported.model.layers[0].self_attn.head_dim == hd
        with torch.no_grad():
            diff = (exported(ids).logits - masked).abs().max().item()
        assert diff <= 1e-4, (combo, diff)
        worst = max(worst, diff)
    print(f"{name}: max |export − masked final| over {len(COMBOS)} set combinations = {worst:.2e}")


def test_tied_export_stays_tied_and_head_dim_is_stated(tmp_path):
    """Qwen2's small sizes tie input and output embeddings: pruning hidden folds the mask
    into the shared matrix once and keeps the tie (no extra vocab × d matrix); head_dim is
    written out because it no longer equals hidden / heads (SPEC §4: 1536 d, 14 × 128)."""
    _, ours, cfg = _source(tmp_path, "qwen2-tied")
    assert "head_dim" not in json.loads((tmp_path / "qwen2-tied" / "config.json").read_text())
    ours.l0 = L0Masks(shape_of(cfg), Shape(3, 40, 4, 2, 128), 10, head_dim_of(cfg))
    with torch.no_grad():
        ours.l0.log_alpha["hidden"].normal_(1.0, 2.0)
        z, _, _ = ours.l0(0, "final")
        small, small_cfg = prune_state_dict(ours.state_dict(), cfg, z)
    assert "lm_head.weight" not in small and small_cfg.tie_word_embeddings
    out = export_hf(small, small_cfg, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert exported.config.head_dim == 16 and exported.config.hidden_size == 40
    assert count_parameters(exported.config) == sum(p.numel() for p in exported.parameters())


def _write_config(tmp_path, name: str, raw: dict):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    return d


def test_unknown_model_type_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2/config\.json: model_type 'gpt2' is not supported.*'qwen2'"):
        load_hf_config(tmp_path / "gpt2")
    with pytest.raises(FamilyError, match="model_type 'gpt2'"):
        MaskedLlama(GPT2Config(n_layer=1, n_embd=32, n_head=2))


@pytest.mark.parametrize("rope,key", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e4}, "rope_scaling.type='dynamic'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                       "original_max_position_embeddings": 64}}, "rope_scaling.rope_type='longrope'"),
])
def test_unsupported_rope_type_refused(tmp_path, rope, key):
    raw = {**LlamaConfig(**BASE, vocab_size=VOCAB, head_dim=16).to_dict(), **rope}
    raw.pop("rope_parameters", None)
    d = _write_config(tmp_path, "rope", raw)
    with pytest.raises(CheckpointError) as e:
        load_hf_config(d)
    assert str(d / "config.json") in str(e.value) and key in str(e.value) and "llama3" in str(e.value)


def test_other_refusals_name_the_key(tmp_path):
    with pytest.raises(FamilyError, match="hidden_act='gelu'"):
        check_config(LlamaConfig(**BASE, hidden_act="gelu"))
    with pytest.raises(FamilyError, match="partial_rotary_factor=0.5"):
        check_config(LlamaConfig(**BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "partial_rotary_factor": 0.5}))


def test_short_sliding_window_refused_before_compute(tmp_path):
    """Mistral v0.1 (window 4096 on every layer) and Qwen2 with use_sliding_window: a
    window shorter than train.seq_len is refused with the key; one that covers it is fine."""
    MistralConfig(**BASE, vocab_size=VOCAB, sliding_window=32).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"m/config\.json: sliding_window=32 \(on every layer\) is shorter "
                                              r"than train\.seq_len=33"):
        load_hf_config(tmp_path / "m", seq_len=33)
    assert load_hf_config(tmp_path / "m", seq_len=32).sliding_window == 32
    Qwen2Config(**BASE, vocab_size=VOCAB, use_sliding_window=True, sliding_window=32,
                max_window_layers=2).save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match=r"layers 2…2 \(use_sliding_window: true, max_window_layers=2\)"):
        load_hf_config(tmp_path / "q", seq_len=64)
    # Qwen2-7B's config.json sets sliding_window but not use_sliding_window: full attention
    Qwen2Config(**BASE, vocab_size=VOCAB, use_sliding_window=False, sliding_window=32).save_pretrained(tmp_path / "q2")
    check_sliding_window(load_hf_config(tmp_path / "q2"), 4096)
    model = MaskedLlama(MistralConfig(**BASE, vocab_size=VOCAB, sliding_window=8))  # the model's own guard
    with pytest.raises(ValueError, match="sliding_window 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_prune_sets():
    src = Shape(layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944)
    qwen_18b = Shape(layers=28, hidden=1536, heads=14, kv_heads=2, intermediate=8960)
    three = ("head", "intermediate", "hidden")
    check_target(src, qwen_18b, three)
    with pytest.raises(TargetShapeError, match=r"prune\.target\.num_hidden_layers=24 .* prune\.sets "
                                               r"\(head, intermediate, hidden\) does not train the 'layer' masks"):
        check_target(src, Shape(24, 1536, 14, 2, 8960), three)
    with pytest.raises(TargetShapeError, match=r"prune\.target\.hidden_size=1536 .* add 'hidden' to prune\.sets"):
        check_target(src, qwen_18b, ("head", "intermediate"))
    with pytest.raises(TargetShapeError, match="'heads' is not a mask set"):
        check_target(src, qwen_18b, ("heads",))
    m = L0Masks(Shape(4, 32, 4, 2, 64), Shape(2, 16, 2, 1, 32), 10, sets=["hidden", "head"])
    assert m.active == ["head", "hidden"] and m.lambdas.shape == (2, 2)
    assert m.keep["layer"] == 4 and m.keep["intermediate"] == 64 and m.target_shape(10)["layers"] == 4
    assert set(m.deterministic()) == {"head", "hidden"}


def test_recipes_fit_their_source_models():
    """The family recipes load, and their targets are reachable from the published source
    shapes (no weights needed: the configs are built with transformers' classes)."""
    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=131072,
                         use_sliding_window=False, max_window_layers=28)
    llama31 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                          rope_parameters={
                              "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    qwen3_8b = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    for path, src in (("configs/qwen2_7b_to_1.8b.yaml", qwen7b), ("configs/llama31_8b_to_4b.yaml", llama31),
                      ("configs/qwen3_8b_to_4b.yaml", qwen3_8b)):
        cfg = load_config(path)
        check_config(src)
        check_sliding_window(src, cfg.train.seq_len)
        t = cfg.prune.target
        check_target(shape_of(src), Shape(t.num_hidden_layers, t.hidden_size, t.num_attention_heads,
                                          t.num_key_value_heads, t.intermediate_size), cfg.prune.sets)
    q = load_config("configs/qwen2_7b_to_1.8b.yaml")
    assert q.prune.sets == ["head", "intermediate", "hidden"] and q.train.steps == 3200
    assert q.domains == ["en", "ru", "zh", "ja", "ar", "tr", "ko", "th"]
    c = load_config("configs/continue_qwen2_1.8b.yaml")
    assert c.stage == "continue" and c.train.steps == 40000 and c.model.init == q.run_dir + "/hf"
    with pytest.raises(ConfigError, match="prune.sets"):
        load_config("configs/qwen2_7b_to_1.8b.yaml", ["prune.sets=[]"])


# ---- GPT-NeoX (Pythia): a second architecture (model/neox.py) ---------------------------------
NEOX = {  # Pythia's: parallel residual, a quarter of each head rotated; and the other settings
    "pythia": dict(use_parallel_residual=True, rotary_pct=0.25),
    "neox-sequential-full-rope": dict(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True),
}


def _neox(tmp_path, name: str, vocab: int = VOCAB):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        **NEOX[name])
    return _saved_and_loaded(GPTNeoXForCausalLM(cfg), tmp_path, name)


@pytest.mark.parametrize("name", list(NEOX))
def test_neox_unmasked_equals_transformers(tmp_path, name):
    hf, ours, cfg = _neox(tmp_path, name)
    assert type(ours.gpt_neox.layers[0].input_layernorm).__name__ == "LayerNorm"
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    rel = ((ref - got).abs().max() / ref.abs().max()).item()
    print(f"{name}: max relative logit diff unmasked = {rel:.2e}")
    assert rel <= 1e-5
    assert count_parameters(cfg) == sum(p.numel() for p in hf.parameters())


# GPT-NeoX's attention is as wide as its hidden size: heads and hidden dimensions prune together
NEOX_COMBOS = [c for c in COMBOS if ("head" in c) == ("hidden" in c)]


@pytest.mark.parametrize("name", list(NEOX))
def test_neox_export_equals_masked_model(tmp_path, name):
    """Every set combination GPT-NeoX can export (heads with hidden): the export, a
    GPTNeoXForCausalLM, gives the masked model's 'final' logits; the LayerNorm's bias stays off
    the pruned dimensions, partial rotary and the residual kind are kept as the config says."""
    from transformers import GPTNeoXForCausalLM

    _, ours, cfg = _neox(tmp_path, name)
    sd = dict(ours.state_dict())
    ids = torch.randint(0, VOCAB, (2, 24))
    target = Shape(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=48)
    for combo in NEOX_COMBOS:
        masked, z, small, small_cfg = _masked_and_pruned(ours, sd, cfg, target, combo, ids, mlp_matrices=2)
        if combo == SETS:
            exported = AutoModelForCausalLM.from_pretrained(export_hf(small, small_cfg, tmp_path / "hf")).eval()
            saved = json.loads((tmp_path / "hf" / "config.json").read_text())
            assert saved["architectures"] == ["GPTNeoXForCausalLM"] and saved["hidden_size"] == 32
            assert saved["rope_parameters"]["partial_rotary_factor"] == cfg.rope_parameters["partial_rotary_factor"]
            assert saved["use_parallel_residual"] == cfg.use_parallel_residual
        else:
            exported = GPTNeoXForCausalLM(small_cfg).eval()
            missing, unexpected = exported.load_state_dict(small, strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}
            if small_cfg.tie_word_embeddings:
                exported.tie_weights()
        assert type(exported) is GPTNeoXForCausalLM
        with torch.no_grad():
            diff = ((exported(ids).logits - masked).abs().max() / masked.abs().max()).item()
        assert diff <= 1e-4, (combo, diff)


def test_neox_targets_it_cannot_write_are_refused(tmp_path):
    """Heads pruned without the hidden size (or the other way round) leave attention narrower
    or wider than the residual, which GPTNeoXForCausalLM cannot hold: refused before any compute,
    naming the key; so is an odd number of rotated dimensions, and a mixture-of-experts config."""
    from megadrp.plan import _check_arch_target

    _, _, cfg = _neox(tmp_path, "pythia")
    with pytest.raises(ConfigError, match=r"prune\.target\.hidden_size=48: GPT-NeoX's attention is as wide"):
        _check_arch_target(cfg, Shape(layers=2, hidden=48, heads=2, kv_heads=2, intermediate=48))
    _check_arch_target(cfg, Shape(layers=2, hidden=32, heads=2, kv_heads=2, intermediate=48))
    odd = json.loads((tmp_path / "pythia" / "config.json").read_text())
    odd["rope_parameters"]["partial_rotary_factor"] = 0.3125  # 5 of 16 dimensions
    (tmp_path / "pythia" / "config.json").write_text(json.dumps(odd))
    with pytest.raises(CheckpointError, match=r"partial_rotary_factor=0.3125 turns 5 dimensions"):
        load_hf_config(tmp_path / "pythia")
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="model_type 'qwen3_moe' is not supported"):
        load_hf_config(moe)
