"""The shipped accelerate configs (recipes/accelerate/*.yaml) load with accelerate's own code.

Each file goes through what ``accelerate launch --config_file FILE`` does before it starts any process:
``load_config_from_file`` (unknown top-level keys are errors there), ``_validate_launch_command`` (the
file's values become launch arguments) and the environment the launcher hands to the workers; the FSDP
plugin is then built from that environment, as ``Accelerator()`` builds it in each
worker. Everything runs on CPU.
The launch commands in each file's header must name bundled train recipes and valid overrides.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "recipes" / "accelerate"
EXPECTED = {
    "single_gpu": "NO",
    "ddp_8gpu": "MULTI_GPU",
    "fsdp_full_shard": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
    "multi_node": "MULTI_GPU",
}
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
UNET_BLOCKS = ["BasicTransformerBlock", "ResnetBlock2D"]


def _cfg(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    return ClusterConfig.from_yaml_file(yaml_file=str(path))


def _launch_args(path: Path):
    """``accelerate launch --config_file path -m smpo_cli train``, up to (not including) starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "smpo_cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def _worker_env(path: Path):
    """The launch arguments and the environment the launcher gives each worker process for this config."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults = _launch_args(path)
    # the launcher refuses a busy main_process_port on a multi-machine rank 0; nothing listens here
    with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            _, env = prepare_deepspeed_cmd_env(args)
        else:
            env = prepare_multi_gpu_env(args)
    return args, env


def _launch_commands(path: Path) -> list[list[str]]:
    commands = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text.startswith("accelerate launch --"):
            commands.append(shlex.split(text))
    return commands


def test_the_configs_are_shipped():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_loads_with_accelerate_and_says_what_its_name_says(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType

    raw = yaml.safe_load(path.read_text())
    unknown = set(raw) - set(ClusterConfig.__dataclass_fields__)
    assert not unknown, f"keys accelerate does not know: {unknown}"
    cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.distributed_type == DistributedType(EXPECTED[path.stem])
    # a bare `no` is YAML for False; accelerate wants the string (smpo's recipe overrides it anyway)
    assert cfg.mixed_precision == "no"
    assert cfg.num_processes == (1 if path.stem == "single_gpu" else 8 * cfg.num_machines)
    assert cfg.use_cpu is False


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_nested_keys_are_launch_arguments(path):
    """``accelerate launch`` copies fsdp_config/deepspeed_config entries onto its arguments by name: a
    misspelt key would be set and silently ignored, so each must be a real launch argument."""
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    cfg = _cfg(path)
    for key in cfg.fsdp_config:
        assert key.startswith("fsdp_") and key in dests, key
    for key in cfg.deepspeed_config:
        assert key in dests, key
    assert not cfg.fp8_config and not cfg.megatron_lm_config and not cfg.parallelism_config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_accepts_it(path):
    args, _ = _launch_args(path)
    cfg = _cfg(path)
    assert args.num_processes == cfg.num_processes and args.num_machines == cfg.num_machines
    assert args.use_fsdp == (EXPECTED[path.stem] == "FSDP")
    assert args.use_deepspeed == (EXPECTED[path.stem] == "DEEPSPEED")
    assert args.multi_gpu == (EXPECTED[path.stem] == "MULTI_GPU")
    if path.stem != "single_gpu":  # the single process starts without a distributed launcher
        args, env = _worker_env(path)
        assert env["ACCELERATE_MIXED_PRECISION"] == "no"
        assert int(args.nproc_per_node) == 8  # processes per machine


def test_multi_node_placeholders():
    cfg = _cfg(CONFIG_DIR / "multi_node.yaml")
    assert cfg.num_machines == 2 and cfg.num_processes == 16 and cfg.machine_rank == 0
    assert cfg.main_process_ip == "MAIN_NODE_IP" and isinstance(cfg.main_process_port, int)
    text = (CONFIG_DIR / "multi_node.yaml").read_text()
    assert "--machine_rank 1" in text and "--main_process_ip" in text
    args, _ = _worker_env(CONFIG_DIR / "multi_node.yaml")
    assert args.nnodes == "2" and args.node_rank == 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_give_smpo_their_zero_stage(stage):
    """What the launcher hands each worker for a DeepSpeed config is what smpo's trainer and memory plan read."""
    from smpo_cli.training.memory import sharding_from_config
    from smpo_cli.training.zero import sharding_of_accelerate_deepspeed

    path = CONFIG_DIR / f"deepspeed_zero{stage}.yaml"
    args, env = _worker_env(path)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and int(args.nproc_per_node) == 8
    assert sharding_of_accelerate_deepspeed(env) == f"zero{stage}"
    plan = sharding_from_config(yaml.safe_load(path.read_text()))
    assert plan.distributed_type == "DEEPSPEED" and plan.processes == 8
    assert sharding_of_accelerate_deepspeed(plan.deepspeed) == f"zero{stage}"


def _fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = _worker_env(CONFIG_DIR / "fsdp_full_shard.yaml")
    with mock.patch.dict(os.environ, env, clear=True):  # the plugin reads (and writes) os.environ
        return FullyShardedDataParallelPlugin()


def test_fsdp2_plugin_from_the_config():
    from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = _fsdp_plugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard, FSDP2 spelling
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == UNET_BLOCKS
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    # false: see the comment in the file (transformers would leave the frozen text encoders empty)
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False  # smpo uses diffusers' gradient checkpointing
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # fsdp_offload_params: false


def _meta_unet(family: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    kwargs = {
        "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
        "sdxl": {
            "sample_size": 128, "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
        },
    }[family]  # fmt: skip
    with init_empty_weights():  # the real architectures, without allocating their weights
        return UNet2DConditionModel(**kwargs)


@pytest.mark.parametrize(("family", "counts"), [("sd15", (16, 22)), ("sdxl", (70, 17))])
def test_fsdp_wrap_classes_exist_in_the_unets(family, counts):
    """The class names resolve in SD1.5's and SDXL's UNets and split them as the config's comment says."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    unet = _meta_unet(family)
    plugin = _fsdp_plugin()
    plugin.set_auto_wrap_policy(unet)  # raises if a class name is not found in the model
    policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
    units = [m for m in unet.modules() if policy(m)]
    by_class = [sum(type(m).__name__ == name for m in units) for name in UNET_BLOCKS]
    assert tuple(by_class) == counts
    wrapped = sum(p.numel() for m in units for p in m.parameters())
    share = wrapped / sum(p.numel() for p in unet.parameters())
    assert share > (0.9 if family == "sd15" else 0.97)
    assert UNET_BLOCKS == list(type(unet)._no_split_modules[:2])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_header_and_launch_commands(path):
    from smpo_cli.config import load_recipe

    text = path.read_text()
    assert text.startswith("# accelerate config: ")
    for part in ("# For:", "# Launch", "# Status:"):
        assert re.search(rf"^{re.escape(part)}", text, re.M), part
    commands = _launch_commands(path)
    assert commands, "no launch command in the header"
    train_recipes = {p.stem for p in (ROOT / "recipes" / "train").glob("*.yaml")}
    for cmd in commands:
        assert cmd[:2] == ["accelerate", "launch"]
        assert cmd[cmd.index("--config_file") + 1] == f"recipes/accelerate/{path.name}"
        module = cmd.index("-m")
        assert cmd[module + 1 : module + 3] == ["smpo_cli", "train"], cmd
        rest = cmd[module + 3 :]
        recipe = rest[rest.index("--recipe") + 1]
        assert recipe in train_recipes, f"{recipe!r} is not a recipe in recipes/train/"
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        load_recipe(recipe, "train", overrides)  # unknown override keys raise


def test_docs_and_recipe_readme_name_every_config():
    docs = (ROOT / "docs" / "distributed.md").read_text()
    readme = (ROOT / "recipes" / "README.md").read_text()
    for path in CONFIGS:
        assert f"recipes/accelerate/{path.name}" in docs, path.name
        assert path.name in readme, path.name
