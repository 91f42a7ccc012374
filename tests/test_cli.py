"""`python -m spr_lightning`: subcommands, the smoke config, and every YAML under configs/ parses."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spr_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMAND = {"smoke": "fit", "dpo": "fit", "eval": "validate", "generate": "predict", "score": "predict",
              "ref_logps": "predict", "sft": "fit", "clip": "fit",
              "vision": "fit"}
STAGE_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "strategy")


def test_help_lists_the_four_subcommands():
    proc = subprocess.run([sys.executable, "-m", "spr_lightning", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in proc.stdout


def test_smoke_config_fits_two_steps_then_validates(tmp_path):
    config = str(ROOT / "configs/smoke/tiny_llava.yaml")
    cli = cli_main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert cli.trainer.callback_metrics["train/loss"] > 0
    cli = cli_main(["validate", "--config", config, f"--trainer.default_root_dir={tmp_path}"])
    assert "val/loss" in cli.trainer.callback_metrics


def stage_of(path: Path) -> str | None:
    """The subcommand of a config: by folder, or for the quickstart's flat folder by file name."""
    if path.parent.name == "quickstart":
        return SUBCOMMAND.get(path.stem.split("_")[0])
    return SUBCOMMAND.get(path.parent.name, "fit")


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_stage_config_parses(path, capsys):
    subcommand = stage_of(path)
    assert subcommand is not None, f"{path}: add its subcommand to SUBCOMMAND (every config here must parse)"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["trainer"] is not None


@pytest.mark.parametrize("strategy", sorted((ROOT / "configs/strategy").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_configs_compose_with_a_dpo_config(strategy, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/dpo/llava_ov.yaml"), "--config", str(strategy),
                  "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"]


def test_wrong_key_fails_before_any_model_loads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "configs/dpo/llava_ov.yaml"), "--model.init_args.lora_rank=8"])
    assert exit_info.value.code != 0
    assert "lora_rank" in capsys.readouterr().err


def test_lora_fsdp_wrap_policy_matches_layers_by_name():
    from torch import nn

    from spr_lightning.strategies import LoRAFSDPStrategy, ModuleNameMatcher

    class LlamaDecoderLayer(nn.Module):
        pass

    matcher = ModuleNameMatcher(["LlamaDecoderLayer"])
    assert matcher(LlamaDecoderLayer()) and not matcher(nn.Linear(2, 2))
    strategy = LoRAFSDPStrategy(layer_class_names=["LlamaDecoderLayer"])
    assert strategy.kwargs["use_orig_params"] is True
    with pytest.raises(ValueError):
        LoRAFSDPStrategy(layer_class_names=[])
