"""Domain groups (data/groups.py): the controller weighs groups, the sampler draws domains."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

from megadrp.config import dump_yaml, load_config
from megadrp.data.groups import DomainGroups, resolve_groups
from megadrp.engine.metrics import evaluation_record
from megadrp.errors import ConfigError
from megadrp.plan import initial_proportion

DOMAINS = ["code", "dna", "math", "prose"]
TOKENS = [300, 100, 100, 500]


def test_listed_members_share_by_tokens_given_members_as_given():
    g = resolve_groups({"tech": ["code", "math"], "bio": ["dna"], "text": {"prose": 5}}, DOMAINS, TOKENS)
    assert g.names == ["tech", "bio", "text"] and g.grouped
    np.testing.assert_allclose(g.share, [0.75, 1.0, 0.25, 1.0])
    q = np.array([0.5, 0.2, 0.3])
    w = g.expand(q)
    np.testing.assert_allclose(w, [0.375, 0.2, 0.125, 0.3])
    np.testing.assert_allclose(g.aggregate(w), q)  # expand then aggregate is the identity
    # a group's loss is its members' losses in the mix it trains on; its tokens their sum
    np.testing.assert_allclose(g.loss([2.0, 3.0, 4.0, 5.0]), [0.75 * 2 + 0.25 * 4, 3.0, 5.0])
    np.testing.assert_allclose(g.tokens(TOKENS), [400, 100, 500])


def test_explicit_shares_are_normalised():
    g = resolve_groups({"all": {"code": 1, "dna": 1, "math": 2, "prose": 4}}, DOMAINS, TOKENS)
    np.testing.assert_allclose(g.share, [0.125, 0.125, 0.25, 0.5])
    np.testing.assert_allclose(g.expand([1.0]).sum(), 1.0)


def test_no_groups_is_the_identity():
    g = resolve_groups(None, DOMAINS, TOKENS)
    assert not g.grouped and g.names == DOMAINS
    np.testing.assert_allclose(g.expand([0.1, 0.2, 0.3, 0.4]), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(g.loss([1, 2, 3, 4]), [1, 2, 3, 4])


@pytest.mark.parametrize("spec,msg", [
    ({"a": ["code", "dna"], "b": ["math"]}, "'prose' in no group"),
    ({"a": ["code", "dna"], "b": ["dna", "math", "prose"]}, "'dna' is in two groups ('a' and 'b')"),
    ({"a": ["code", "dna", "math", "prose", "web"]}, "domain_groups.a: 'web' is not one of the run's domains"),
    ({"a": [], "b": DOMAINS}, "domain_groups.a: a group needs at least one domain"),
    ({"a": {"code": 0, "dna": 1, "math": 1, "prose": 1}}, "domain_groups.a: the shares"),
    ({"a": "code", "b": ["dna", "math", "prose"]}, "domain_groups.a: give a list of domains or a mapping"),
    ({"a": ["code", "code"], "b": ["dna", "math", "prose"]}, "domain_groups.a: 'code' is listed twice"),
])
def test_bad_groups_are_named(spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        resolve_groups(spec, DOMAINS, TOKENS)


def test_one_domain_a_group_renamed_and_reordered_is_still_grouped():
    """Groups of one domain each, in another order and under other names: the controller's
    numbers are keyed (and ordered) by the groups, so the run is grouped."""
    g = resolve_groups({"p": ["prose"], "m": ["math"], "d": ["dna"], "c": ["code"]}, DOMAINS, TOKENS)
    assert g.grouped and g.names == ["p", "m", "d", "c"]
    np.testing.assert_allclose(g.aggregate([0.1, 0.2, 0.3, 0.4]), [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(g.expand([0.4, 0.3, 0.2, 0.1]), [0.1, 0.2, 0.3, 0.4])


def test_initial_proportion_is_over_groups():
    g = resolve_groups({"tech": ["code", "math"], "rest": ["dna", "prose"]}, DOMAINS, TOKENS)
    domains = [SimpleNamespace(train_tokens=t) for t in TOKENS]
    np.testing.assert_allclose(initial_proportion("uniform", domains, DOMAINS, groups=g), [0.5, 0.5])
    np.testing.assert_allclose(initial_proportion("tokens", domains, DOMAINS, groups=g), [0.4, 0.6])
    np.testing.assert_allclose(initial_proportion({"tech": 3, "rest": 1}, domains, DOMAINS, groups=g), [0.75, 0.25])
    with pytest.raises(ConfigError, match="4 values for 2 groups"):
        initial_proportion([1, 1, 1, 1], domains, DOMAINS, groups=g)


def test_carried_domain_weights_are_summed_into_groups(tmp_path):
    """`initial_proportion: carried` from a run without groups: its per-domain weights are added up
    into the new run's groups; from a grouped run, its `domain_weights` are."""
    run = tmp_path / "prune"
    (run / "hf").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 4, "weights": {"code": 0.1, "dna": 0.2, "math": 0.3, '
                                       '"prose": 0.4}}\n')
    g = resolve_groups({"tech": ["code", "math"], "rest": ["dna", "prose"]}, DOMAINS, TOKENS)
    domains = [SimpleNamespace(train_tokens=t) for t in TOKENS]
    np.testing.assert_allclose(initial_proportion("carried", domains, DOMAINS, model_init=str(run / "hf"), groups=g),
                               [0.4, 0.6])
    (run / "metrics.jsonl").write_text('{"step": 4, "weights": {"a": 0.5, "b": 0.5}, "domain_weights": {"code": 0.1, '
                                       '"dna": 0.1, "math": 0.1, "prose": 0.7}}\n')
    np.testing.assert_allclose(initial_proportion("carried", domains, DOMAINS, model_init=str(run / "hf")),
                               [0.1, 0.1, 0.1, 0.7])


def test_metrics_key_the_controller_by_group_and_the_sampler_by_domain():
    g = resolve_groups({"tech": ["code", "math"], "rest": ["dna", "prose"]}, DOMAINS, TOKENS)
    decision = SimpleNamespace(reference_loss=[1.0, 2.0], reference_ratio=[0.3, 0.7], step=4, fits=None,
                               predicted_loss=None, reasons=None)
    state = SimpleNamespace(last_decision=decision, tokens=[1, 2, 3, 4], ema=[1.0] * 4, bad_total=0)
    ev = SimpleNamespace(loss=np.array([2.0, 3.0, 4.0, 5.0]))
    rec = evaluation_record(4, "prune", 1, DOMAINS, state, ev, g.expand([0.3, 0.7]), [], controller_restarts=0,
                            lrs={}, eval_seconds=0, wait_seconds=0, controller_cpu_seconds=0, groups=g)
    assert set(rec["domain_weights"]) == set(DOMAINS) and set(rec["reference_loss"]) == {"tech", "rest"}
    assert rec["weights"] == pytest.approx({"tech": 0.3, "rest": 0.7})
    assert rec["group_eval_loss"]["tech"] == pytest.approx(0.75 * 2 + 0.25 * 4)
    plain = evaluation_record(4, "prune", 1, DOMAINS, state, ev, [0.25] * 4, [], controller_restarts=0, lrs={},
                              eval_seconds=0, wait_seconds=0, controller_cpu_seconds=0,
                              groups=DomainGroups.identity(DOMAINS))
    assert "domain_weights" not in plain and set(plain["weights"]) == set(DOMAINS)


def test_config_round_trips_both_spellings(tmp_path):
    cfg = load_config(ROOT / "configs/tiny/prune.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg) + "domain_groups:\n  tech: [code, math]\n  rest: {dna: 1, prose: 2}\n")
    again = load_config(path)
    assert again.domain_groups == {"tech": ["code", "math"], "rest": {"dna": 1.0, "prose": 2.0}}
    (tmp_path / "d.yaml").write_text(dump_yaml(again))
    assert load_config(tmp_path / "d.yaml").domain_groups == again.domain_groups


def test_eval_p0_by_name_equals_the_list_in_the_domains_order():
    """`megadrp eval --shift --p0 name=value,...` (how a benchmark puts every schedule under one
    χ² ball): the same mix as the list in the run's order, whatever order the names come in."""
    from megadrp.tools.evaluate import _p0

    manifest = SimpleNamespace(select=lambda names: [SimpleNamespace(train_tokens=t) for t in TOKENS])
    by_list = _p0("0.1,0.2,0.3,0.4", manifest, DOMAINS, "--p0")
    by_name = _p0("prose=4,math=3,dna=2,code=1", manifest, DOMAINS, "--p0")
    np.testing.assert_allclose(by_name, by_list)
    np.testing.assert_allclose(by_list, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ConfigError, match="no entry for domain"):
        _p0("prose=4,math=3", manifest, DOMAINS, "--p0")
    with pytest.raises(ValueError, match="name=number"):
        _p0("prose=4,math=x", manifest, DOMAINS, "--p0")
