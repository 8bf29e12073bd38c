"""``smpo env``: versions, platform and GPUs, to paste into bug reports."""

from __future__ import annotations

import json

from smpo_cli.cli._console import out
from smpo_cli.cli.options import JsonOpt

EPILOG = "Examples:\n\n  smpo env\n\n  smpo env --json > env.json"


def env(as_json: JsonOpt = False) -> None:
    """Print smpo, Python, platform, torch/CUDA/GPUs and library versions."""
    from rich.table import Table

    from smpo_cli.utils.envinfo import collect_env

    info = collect_env()
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("smpo", info["smpo"] + (f" (git {info['git_sha']})" if info["git_sha"] else ""))
    table.add_row("python", info["python"])
    table.add_row("platform", info["platform"])
    build = info["torch_build"]
    if build:
        table.add_row("torch", f"{build['version']} (CUDA build: {build['cuda'] or 'none'}, {build['threads']} threads)")
        dev = info["device"]
        if dev["cuda_available"]:
            for i, gpu in enumerate(dev["gpus"]):
                table.add_row(f"cuda:{i}", f"{gpu['name']}, {gpu['memory_gib']} GiB")
        else:
            table.add_row("cuda", "not available" + (" (mps available)" if build["mps_available"] else ""))
    for name, version in info["packages"].items():
        if name != "torch":
            table.add_row(name, version or "not installed")
    out.print(table)
