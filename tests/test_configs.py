"""Every YAML under configs/ and experiments/ opens with the command that runs it and resolves with its config class."""

from __future__ import annotations

from pathlib import Path

import pytest

from cllm import config
from cllm.training.config import DraftConfig
from cllm.pipeline import PipelineConfig, eval_config, plan
from cllm.training.config import TrainConfig
from cllm.data.trajectories import GenConfig

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("experiments/**/*.yaml"))


def config_class(path: Path):
    command = path.read_text().splitlines()[0].split()[1:3]
    if command == ["cllm", "train"]:  # a row that trains on data collected by another config
        return TrainConfig
    if path.parent.name == "data_gen" or path.name.startswith("data_"):
        return GenConfig
    if path.parts[-3:-1] == ("ablation", "configs"):
        return PipelineConfig
    return {"train": TrainConfig, "draft": DraftConfig, "pipeline": PipelineConfig}[path.parent.name]


def test_there_are_configs():
    assert len(YAMLS) >= 15


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_opens_with_its_command_and_resolves(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and str(path.relative_to(ROOT)) in first, first
    if path.parent.name == "decode":  # `cllm decode` flags by name: its parser checks keys and choices
        from cllm.cli import build_parser, yaml_defaults

        yaml_defaults(build_parser().commands["decode"], str(path))
        return
    cls = config_class(path)
    data = config.read_yaml(cls, path)  # unknown keys and wrong types are errors
    if cls is PipelineConfig:
        if data.get("trajectories"):  # the shared data is collected by another config; stand in a folder
            (tmp_path / "manifest.json").write_text("{}")
            data["trajectories"] = str(tmp_path)
        if (data.get("train") or {}).get("init_adapter"):  # another row's adapter (a20 continues a19's): stand one in
            (tmp_path / "adapter").mkdir()
            (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
            data["train"] = {**data["train"], "init_adapter": str(tmp_path / "adapter")}
        cfg = config.resolve(PipelineConfig, data)
        eval_config(cfg, cfg.model)
        stages = plan(cfg)  # every round's gen and train options resolve
        assert len(stages) == 1 + len(cfg.rounds)
    elif cls is TrainConfig:
        config.resolve(TrainConfig, {**data, "data": ["x"]})
    else:
        if cls is GenConfig and "--out" in first:  # the output folder is given on the command line
            data.setdefault("out", str(tmp_path))
        config.resolve(cls, data)


def test_probe_interval_must_fall_on_logging_steps():
    from cllm.errors import CllmError

    base = {"data": ["x"], "output_dir": "out", "jacobi_eval_steps": 150, "trainer": {"logging_steps": 20}}
    with pytest.raises(CllmError, match="--jacobi-eval-steps 150 must be a multiple of --logging-steps 20"):
        config.resolve(TrainConfig, base)
    config.resolve(TrainConfig, {**base, "jacobi_eval_steps": 300})
