"""Tiny converted repos in a local hub cache, shared by the hub tests (test_hub_repos, test_remote_code, ...).

Repos are built from the synthetic original checkpoints with the real converters and laid out in a huggingface_hub
cache under the released repo ids, so that tests load them as users do: by repo id, offline, in a fresh process
(huggingface_hub reads its environment at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _hub_cache import add_to_hub_cache

REPO_IDS = {
    "cpmbee": "openbmb/cpm-bee-10b",
    "viscpm_chat": "openbmb/VisCPM-Chat",
    "viscpm_paint": "openbmb/VisCPM-Paint",
}
# A narrow CPM-Bee: the real 86,583-entry vocabulary dominates the size anyway.
TINY_LLM = {"dim_model": 16, "dim_ff": 32, "dim_head": 8}

# Prepended to subprocess code that must run as if transformers_viscpm were not installed. The package is installed
# editable (through a meta-path finder), so trimming sys.path is not enough: a finder in front of all others refuses
# the package, and the prelude proves it.
HIDE_PLUGIN = textwrap.dedent(
    """\
    import sys

    class _HidePlugin:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers_viscpm" or name.startswith("transformers_viscpm."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _HidePlugin())
    try:
        import transformers_viscpm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("transformers_viscpm is still importable")
    """
)


def _code_option(remote_code: bool, default: bool = True) -> dict[str, bool]:
    """Converter keywords for ``remote_code``, left at the converter's default when it is the default."""
    return {} if remote_code == default else {"remote_code": remote_code}


def build_cpmbee(folder: Path, remote_code: bool) -> Path:
    """Convert a seeded tiny original CPM-Bee checkpoint into ``folder/converted``."""
    from transformers_viscpm.conversion.convert_cpmbee import convert_cpmbee
    from transformers_viscpm.synthetic.cpmbee import original_cpmbee_state_dict, tiny_cpmbee_config

    cfg = tiny_cpmbee_config(**TINY_LLM)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(original_cpmbee_state_dict(cfg, seed=3), folder / "cpm-bee-10b.pt")
    (folder / "cpm-bee-10b.json").write_text(json.dumps(cfg))
    return convert_cpmbee(
        folder / "cpm-bee-10b.pt",
        folder / "cpm-bee-10b.json",
        folder / "converted",
        show_progress=False,
        **_code_option(remote_code),
    )


def build_viscpm_chat(folder: Path, remote_code: bool) -> Path:
    """Convert a seeded tiny original VisCPM-Chat checkpoint (no MIM head) into ``folder/converted``."""
    from transformers_viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat
    from transformers_viscpm.synthetic.chat import TINY_CHAT_VISION, original_chat_state_dict, tiny_chat_llm_config

    llm_config = tiny_chat_llm_config(**TINY_LLM)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "viscpm_chat_balance_checkpoint.pt"
    # a heavy `</s>` row ends the random model's answers at once, so that card snippets (512 new tokens) stay fast
    torch.save(original_chat_state_dict(llm_config, include_mim_head=False, eos_scale=10.0), checkpoint)
    return convert_viscpm_chat(
        checkpoint,
        folder / "converted",
        llm_config=llm_config,
        vision_config=TINY_CHAT_VISION,
        show_progress=False,
        **_code_option(remote_code),
    )


def build_viscpm_paint(folder: Path, remote_code: bool) -> Path:
    """Convert a seeded tiny original VisCPM-Paint checkpoint plus a tiny SD-2.1 base into ``folder/converted``."""
    from transformers_viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint
    from transformers_viscpm.synthetic.paint import TINY_PAINT_CPMBEE, original_paint_state_dict, write_sd_base

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "viscpm_paint_balance_checkpoint.pt"
    torch.save(original_paint_state_dict(), checkpoint)
    write_sd_base(folder / "sd-base")
    return convert_viscpm_paint(
        checkpoint,
        folder / "sd-base",
        folder / "converted",
        llm_config=TINY_PAINT_CPMBEE,
        show_progress=False,
        **_code_option(remote_code, default=False),
    )


BUILDERS = {"cpmbee": build_cpmbee, "viscpm_chat": build_viscpm_chat, "viscpm_paint": build_viscpm_paint}
_BUILT: dict[tuple[str, bool], Path] = {}


def converted_repo(tmp_path_factory: pytest.TempPathFactory, kind: str, remote_code: bool) -> Path:
    """The converted folder of ``kind`` (with its code when ``remote_code``), built once per test session."""
    key = (kind, remote_code)
    if key not in _BUILT:
        folder = tmp_path_factory.mktemp(f"{kind}-{'remote' if remote_code else 'plugin'}")
        _BUILT[key] = BUILDERS[kind](folder, remote_code)
    return _BUILT[key]


_CACHES: dict[bool, Path] = {}


def hub_cache(tmp_path_factory: pytest.TempPathFactory, remote_code: bool) -> Path:
    """A hub cache holding every kind under its released repo id (the remote-code variants when asked)."""
    if remote_code not in _CACHES:
        cache = tmp_path_factory.mktemp("hub-remote" if remote_code else "hub-plugin")
        for kind, repo_id in REPO_IDS.items():
            # diffusers 0.42.1 asks the hub for the commit of a custom pipeline file whenever the cached tree listing
            # names it (DiffusionPipeline.download -> get_cached_module_file -> model_info), which fails offline; a
            # repo fetched file by file has no listing, and the pipeline then loads from the local snapshot.
            listing = not (remote_code and kind == "viscpm_paint")
            add_to_hub_cache(converted_repo(tmp_path_factory, kind, remote_code), repo_id, cache, tree_listing=listing)
        _CACHES[remote_code] = cache
    return _CACHES[remote_code]


def offline_env(cache: Path, modules: Path) -> dict[str, str]:
    """Environment of a process that may only read ``cache`` (its dynamic modules go to ``modules``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),
        HF_MODULES_CACHE=str(modules),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_python(code: str, env: dict[str, str], cwd: Path, hide_plugin: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line, which is returned."""
    source = (HIDE_PLUGIN if hide_plugin else "") + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", source],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,  # transformers asks on stdin before running a repo's code: answer no
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])
