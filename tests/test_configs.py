"""The shipped recipes in configs/*.yaml: loadable, only known keys, valid, and faithful to their sources."""

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from slime_self_distill.config import ARG_PREFIX, SelfDistillConfig
from slime_self_distill.train import plan_launch


def precheck_self_distill_settings(argv):
    return plan_launch([*argv, "--ref-load", "/ckpt/initial"]).config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("sdft.yaml", "sdft_topk.yaml", "opsd.yaml", "sampled_token_reverse_kl.yaml")
KNOWN_KEYS = {ARG_PREFIX + f.name for f in dataclasses.fields(SelfDistillConfig)}


def load(name: str) -> dict:
    with open(CONFIG_DIR / name) as f:
        return yaml.safe_load(f)


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_keys_are_knobs_and_validate(name):
    data = load(name)
    assert isinstance(data, dict) and data, f"{name} is not a non-empty mapping"
    assert set(data) <= KNOWN_KEYS, f"{name}: unknown keys {sorted(set(data) - KNOWN_KEYS)}"
    config = SelfDistillConfig.from_args(argparse.Namespace(**data))
    for key, value in data.items():
        assert getattr(config, key[len(ARG_PREFIX):]) == value, key  # nothing coerced or dropped


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_passes_the_launcher_precheck(name):
    config = precheck_self_distill_settings(["--custom-config-path", str(CONFIG_DIR / name), "--lr", "1e-6"])
    assert config == SelfDistillConfig.from_args(argparse.Namespace(**load(name)))


OFFICIAL_SDFT = {
    # github.com/idanshen/Self-Distillation (DistilTrainer defaults), self-distillation-math.md
    "kl_scope": "full_vocab",
    "divergence": "forward_kl",
    "teacher": "ema",
    "ema_rate": 0.01,
    "ema_update_interval": "step",
    "num_loss_tokens_to_skip": 3,
    "importance_correction": "sequence",
    "importance_cap": 2.0,
    "top_entropy_quantile": 1.0,
}


def test_sdft_recipe_has_the_official_values():
    config = SelfDistillConfig.from_args(argparse.Namespace(**load("sdft.yaml")))
    assert {k: getattr(config, k) for k in OFFICIAL_SDFT} == OFFICIAL_SDFT
    assert config.alpha_js_weight == 0.0  # forward KL, the official alpha = 0


def test_sdft_topk_differs_from_sdft_only_in_scope():
    sdft, topk = load("sdft.yaml"), load("sdft_topk.yaml")
    assert topk[ARG_PREFIX + "kl_scope"] == "topk" and topk[ARG_PREFIX + "topk"] == 64
    changed = {k for k in sdft.keys() | topk.keys() if sdft.get(k) != topk.get(k)}
    assert changed == {ARG_PREFIX + "kl_scope", ARG_PREFIX + "topk"}


def test_opsd_recipe():
    config = SelfDistillConfig.from_args(argparse.Namespace(**load("opsd.yaml")))
    assert (config.teacher, config.divergence, config.alpha) == ("frozen", "alpha_js", 0.5)
    assert config.alpha_js_weight == 0.5


def test_sampled_token_reverse_kl_recipe():
    config = SelfDistillConfig.from_args(argparse.Namespace(**load("sampled_token_reverse_kl.yaml")))
    assert (config.kl_scope, config.divergence) == ("sampled_token", "reverse_kl")
    assert config.alpha_js_weight == 1.0
