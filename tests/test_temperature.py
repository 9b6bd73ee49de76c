"""`rollout.temperature: auto`: the config keys, the search, and a number in the config passing through untouched.

The controller on the real tiny model (vLLM probes, entropy from both pipeline stages, within 0.05 of the target
on the step's fresh rollouts, kept across a kill and resume) is tested in test_train_run.py, on its runs.
"""

from __future__ import annotations

import math

import pytest

from megatron_rl.config import ConfigError, load_config
from megatron_rl.train.temperature import STATE_KEY, RolloutTemperature, search_temperature


def test_auto_and_its_keys_validate():
    cfg = load_config(
        None,
        [
            "rollout.temperature=auto",
            "rollout.auto_temperature.target_entropy=0.4",
            "rollout.auto_temperature.bounds=[0.5,1.5]",
            "rollout.auto_temperature.every=10",
            "rollout.auto_temperature.probe_prompts=8",
            "rollout.auto_temperature.probe_samples=2",
            "rollout.auto_temperature.max_probes=4",
            "rollout.auto_temperature.tolerance=0.02",
        ],
    )
    auto = cfg.rollout.auto_temperature
    assert cfg.rollout.temperature == "auto" and auto.bounds == (0.5, 1.5) and auto.every == 10
    assert (auto.target_entropy, auto.probe_prompts, auto.probe_samples, auto.max_probes) == (0.4, 8, 2, 4)
    assert load_config(None, ["rollout.temperature=1"]).rollout.temperature == 1.0  # a number stays a number
    assert load_config(None, []).rollout.auto_temperature.target_entropy == 0.3


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.temperature=hot", "config key 'rollout.temperature': Value error, must be a number > 0 or 'auto'"),
        ("rollout.temperature=0", "config key 'rollout.temperature': Value error, must be a number > 0 or 'auto'"),
        ("rollout.temperature=true", "config key 'rollout.temperature'"),
        ("rollout.auto_temperature.bounds=[1.2,0.6]", "config key 'rollout.auto_temperature.bounds': Value error, must be [low, high] with 0 < low < high <= 2"),
        ("rollout.auto_temperature.bounds=[0.6,3]", "config key 'rollout.auto_temperature.bounds'"),
        ("rollout.auto_temperature.target_entropy=-0.3", "config key 'rollout.auto_temperature.target_entropy'"),
        ("rollout.auto_temperature.every=-1", "config key 'rollout.auto_temperature.every'"),
        ("rollout.auto_temperature.max_probes=0", "config key 'rollout.auto_temperature.max_probes'"),
        ("rollout.auto_temperature.probes=3", "unknown config key 'rollout.auto_temperature.probes'"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def entropy_curve(t: float) -> float:
    """Mean entropy against temperature shaped like the tiny SFT model's (0.04 at 0.3, 0.28 at 0.95, 2.4 at
    1.65: about exponential)."""
    return 0.0381 * math.exp(3.1 * (t - 0.3))


@pytest.mark.parametrize("start", [0.3, 0.9, 1.2, 2.0])
@pytest.mark.parametrize("target", [0.1, 0.3, 1.0])
def test_search_lands_within_tolerance_inside_the_bounds(start, target):
    best, probes = search_temperature(entropy_curve, target, (0.3, 2.0), start, 6, 0.01)
    assert abs(best.entropy - target) <= 0.01 and len(probes) <= 6
    assert all(0.3 <= p.temperature <= 2.0 for p in probes)
    assert best == min(probes, key=lambda p: abs(p.entropy - target))
    assert best.entropy == entropy_curve(best.temperature)


def test_search_bisects_when_interpolation_stalls():
    """A curve far from exponential (flat, then steep) still gets within tolerance in the probes allowed."""
    best, probes = search_temperature(lambda t: 0.05 + 0.5 * t**4, 0.3, (0.3, 2.0), 0.9, 8, 0.01)
    assert abs(best.entropy - 0.3) <= 0.01, probes


@pytest.mark.parametrize("target,bound", [(0.001, 0.6), (5.0, 1.2)])
def test_unreachable_target_ends_at_the_nearest_bound(target, bound):
    best, probes = search_temperature(entropy_curve, target, (0.6, 1.2), 0.9, 6, 0.01)
    assert best.temperature == bound and [p.temperature for p in probes] == [0.9, bound]


def test_search_stops_after_max_probes():
    best, probes = search_temperature(entropy_curve, 0.3, (0.3, 2.0), 0.3, 2, 0.0)
    assert [p.temperature for p in probes] == [0.3, 2.0] and best.temperature == 0.3


def test_noisy_entropy_still_ends_in_a_probe_nearest_the_target():
    """Entropy measured with noise (not monotone in T at small scales): the search stays in the bounds and
    returns the best probe it made."""
    noisy = lambda t: entropy_curve(t) * (1 + 0.1 * math.sin(97 * t))  # noqa: E731
    best, probes = search_temperature(noisy, 0.3, (0.6, 1.2), 0.9, 6, 0.001)
    assert len(probes) == 6 and all(0.6 <= p.temperature <= 1.2 for p in probes)
    assert best == min(probes, key=lambda p: abs(p.entropy - 0.3)) and abs(best.entropy - 0.3) < 0.05


class Untouchable:
    """An engine or policy that fails the test if anything is asked of it."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} used with a fixed temperature")


def test_a_number_passes_through_untouched():
    """With a number the step loop gets the config object itself at every step: nothing probed, nothing saved,
    the temperature logged."""
    cfg = load_config(None, ["rollout.temperature=0.85"])
    control = RolloutTemperature(
        cfg, Untouchable(), Untouchable(), Untouchable(), Untouchable(), {STATE_KEY: 1.1}
    )
    for step in (1, 2, 26, 51):
        assert control.config_for(step) is cfg
        assert control.metrics() == {"temperature": 0.85} and control.state() == {}


def test_auto_choice_is_due_at_the_start_every_n_steps_and_without_a_saved_one():
    cfg = load_config(None, ["rollout.temperature=auto", "rollout.auto_temperature.every=3"])
    fresh = RolloutTemperature(cfg, None, None, None, None, {})
    assert fresh.due(1) and fresh.due(7)  # nothing chosen yet
    resumed = RolloutTemperature(cfg, None, None, None, None, {"step": 2, STATE_KEY: 0.8})
    assert [s for s in range(3, 11) if resumed.due(s)] == [4, 7, 10]
    step_cfg = resumed.config_for(3)
    assert step_cfg.rollout.temperature == 0.8 and cfg.rollout.temperature == "auto"
    assert step_cfg.eval == cfg.eval and step_cfg.grpo == cfg.grpo
    assert resumed.metrics() == {"temperature": 0.8} and resumed.state() == {STATE_KEY: 0.8}
    once = load_config(None, ["rollout.temperature=auto", "rollout.auto_temperature.every=0"])
    assert not any(
        RolloutTemperature(once, None, None, None, None, {STATE_KEY: 0.8}).due(s) for s in range(1, 9)
    )
