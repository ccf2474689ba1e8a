"""The `fast` presets (issue 17): one for every trainable method, valid, sourced, and checked.

A fast preset is a shortened schedule (at most 1/10 of the paper schedule's training FLOPs,
chosen on validation rows; docs/methods/<name>.md says how) that `bench --profile fast` and
`name:preset=fast` use. The paper schedule stays each method's default.
"""

from __future__ import annotations

import pytest
import yaml

import clipadapt
from clipadapt.methods.base import PRESET_DIR, create_method, method_presets, parse_method_spec
from clipadapt.testing import yield_checks

#: Methods whose fast preset is made on another branch; the lead empties this list when they
#: are merged (an entry whose preset exists shows up as XPASS, not as a failure).
PENDING: dict[str, str] = {}

TRAINABLE = clipadapt.list_methods(trainable=True)


def _pending(name: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.xfail(reason=PENDING[name], strict=False)] if name in PENDING else []


@pytest.mark.parametrize("name", [pytest.param(name, marks=_pending(name)) for name in TRAINABLE])
def test_every_trainable_method_has_a_sourced_fast_preset(name: str) -> None:
    assert "fast" in method_presets(name), f"{name}: no `fast` preset in presets/{name}.yaml"
    data = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    # the file's source says where the fast preset comes from (how it was chosen)
    assert "fast" in data["source"], f"presets/{name}.yaml: the source does not cover `fast`"
    fast = create_method(name, preset="fast")  # unknown options or bad values raise
    paper = create_method(name)
    changed = {k for k, v in fast.get_params().items() if paper.get_params()[k] != v}
    assert changed == set(method_presets(name)["fast"]), changed
    # the same preset through a method spec, with an explicit option on top (the seed, where
    # the method has one)
    extra = {"seed": 7} if "seed" in paper.get_params() else {}
    spec = f"{name}:preset=fast" + "".join(f",{k}={v}" for k, v in extra.items())
    spec_name, params = parse_method_spec(spec)
    from_spec = create_method(spec_name, **params)
    assert from_spec.get_params() == {**fast.get_params(), **extra}


def test_pending_list_names_only_trainable_methods() -> None:
    assert set(PENDING) <= set(TRAINABLE)


def _fast_checks() -> list:
    cases = []
    for name in TRAINABLE:
        preset = method_presets(name).get("fast")
        if preset is None or name in PENDING:
            continue
        exempt = clipadapt.method_card(name).expected_failed_checks
        for check_name, check in yield_checks(name, params={name: preset}):
            marks = [pytest.mark.xfail(reason=exempt[check_name])] if check_name in exempt else []
            cases.append(pytest.param(check, id=f"{name}:fast-{check_name}", marks=marks))
    return cases


@pytest.mark.parametrize("check", _fast_checks())
def test_fast_presets_pass_the_method_checks(check) -> None:
    check()


#: |mean fast − mean paper| allowed on the small problem, in accuracy points (mean of seeds 1-3,
#: 1,000 test rows). About one standard error of one such accuracy (near 40 %: 1.5 pt) plus the
#: paper schedule's own seed-to-seed spread there (HeGraphAdapter: 1.8 pt over seeds 1-5), so a
#: difference above it is more than the noise of the comparison. The measured differences per
#: method are in docs/methods/<name>.md ("The fast preset").
AGREEMENT_POINTS = 2.0


#: Methods the small problem cannot run, with the reason (their comparison is in their docs).
NO_SMALL_PROBLEM = {
    "coop": "needs a text tower, which the fixture has not; measured on the world task in "
    "docs/methods/coop.md",
}


#: Fast presets measured to disagree with the paper schedule on the small problem (strict: the
#: test fails if they start agreeing, so this list stays true). ZS-LP and GraphAdapter enlarge
#: the batch, which on ImageNet keeps several steps per epoch but here leaves one: 24 / 30
#: optimisation steps against the paper schedule's 300. Means over seeds 1-3.
KNOWN_DISAGREEMENT = {
    "zs_linear_probe": "fast 39.4 vs paper 37.1 (one step per epoch at batch 128 and lr 0.7 here)",
    "graph_adapter": "fast 29.8 vs paper 34.9 (one step per epoch at batch 128 here)",
}


def _agreement_cases() -> list:
    cases = []
    for name in TRAINABLE:
        if name in NO_SMALL_PROBLEM:
            marks = [pytest.mark.skip(reason=NO_SMALL_PROBLEM[name])]
        elif name in KNOWN_DISAGREEMENT:
            marks = [pytest.mark.xfail(reason=KNOWN_DISAGREEMENT[name], strict=True)]
        else:
            marks = _pending(name)
        cases.append(pytest.param(name, marks=marks))
    return cases


@pytest.mark.parametrize("name", _agreement_cases())
def test_fast_and_paper_schedules_agree_on_a_small_problem(name: str) -> None:
    """A small, far-from-saturated problem (zero-shot 29 %): the fast preset's mean test accuracy
    over seeds 1-3 is within :data:`AGREEMENT_POINTS` of the paper schedule's."""
    from clipadapt.testing.checks import make_fixture

    fx = make_fixture(
        num_classes=10, dim=32, shots=8, views=3, noise_scale=0.5, test_per_class=100, seed=0
    )
    assert "fast" in method_presets(name)
    means = {}
    for preset in (None, "fast"):
        accuracies = []
        for seed in (1, 2, 3):
            method = create_method(name, preset=preset)
            if "seed" in method.get_params():
                method.set_params(seed=seed)
            text = fx.text if method.card.needs_text else None
            method.fit(fx.train, text, fx.val, num_classes=None if text else 10)
            accuracies.append(method.score(fx.test.features, fx.test.labels))
        means[preset] = sum(accuracies) / len(accuracies)
    assert 20 < means[None] < 90, means  # neither chance (10 %) nor saturated
    assert abs(means["fast"] - means[None]) <= AGREEMENT_POINTS, means
