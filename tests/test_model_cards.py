"""Model cards: valid hub metadata, and usage snippets that run as written against the converted repos.

Every ```python block of every rendered card is executed by repo id against a local hub cache, offline. A snippet
that does not import transformers_viscpm must run where the package cannot be imported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _hub_cache import CARD_METADATA, parse_model_card, python_snippets
from _repos import REPO_IDS, converted_repo, hub_cache, offline_env, run_python
from huggingface_hub import ModelCard, ModelCardData

from transformers_viscpm.hub import PACKAGE_DIR

KINDS = list(REPO_IDS)


def _card(tmp_path_factory: pytest.TempPathFactory, kind: str, remote_code: bool) -> str:
    return (converted_repo(tmp_path_factory, kind, remote_code) / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("remote_code", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_rendered_cards_have_valid_hub_metadata(
    tmp_path_factory: pytest.TempPathFactory, kind: str, remote_code: bool
) -> None:
    text = _card(tmp_path_factory, kind, remote_code)
    card = parse_model_card(text, kind)
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "general-model-license"
    assert data["language"] == ["zh", "en"] and "transformers-viscpm" in data["tags"]
    assert (data["library_name"], data["pipeline_tag"]) == (
        CARD_METADATA[kind]["library_name"],
        CARD_METADATA[kind]["pipeline_tag"],
    )
    # the metadata survives huggingface_hub's own round trip
    assert ModelCardData(**data).to_dict() == data
    assert ModelCard(str(card)).data.to_dict() == data
    assert ("## Loading without transformers-viscpm" in text) == remote_code
    snippets = python_snippets(text)
    assert len(snippets) == 1 + remote_code
    if remote_code:
        assert all("trust_remote_code=True" in line for line in snippets[1].splitlines() if "from_pretrained(" in line)
        assert "transformers_viscpm" not in snippets[1]


def test_templates_are_the_shipped_cards() -> None:
    for kind in KINDS:
        template = (PACKAGE_DIR / "model_cards" / f"{kind}.md").read_text(encoding="utf-8")
        assert "${repo_id}" in template
        # Cards link to this project, and carry no benchmark table (a converted random-weight repo has no such scores).
        assert "[transformers-viscpm](https://pypi.org/project/transformers-viscpm/)" in template
        assert "| Model |" not in template and "/work/" not in template and "/tmp/" not in template
        assert ModelCard(template).data.library_name == CARD_METADATA[kind]["library_name"]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("license: other", "license: apache-2.0"), "license is 'apache-2.0'"),
        (lambda t: t.replace("- zh\n", ""), "language is ['en']"),
        (lambda t: t.replace("pipeline_tag: text-generation", "pipeline_tag: text2text-generation"), "pipeline_tag"),
        (lambda t: t.replace("- transformers-viscpm\n", ""), "lack 'transformers-viscpm'"),
        (lambda t: t.replace("(1M)", "(${variant})"), "unfilled placeholders ['${variant}']"),
        (lambda t: t.replace("library_name: transformers", "library_name: diffusers"), "library_name"),
    ],
)
def test_bad_metadata_is_refused(tmp_path_factory: pytest.TempPathFactory, edit, problem: str) -> None:
    text = _card(tmp_path_factory, "cpmbee", False)
    parse_model_card(text, "cpmbee")
    with pytest.raises(ValueError, match="cpmbee model card: .*" + re.escape(problem)):
        parse_model_card(edit(text), "cpmbee")


def _runner(snippets: list[str]) -> str:
    """One process running several snippets, each in a fresh namespace, then reporting how many ran."""
    calls = "".join(
        f"exec(compile({s!r}, 'snippet-{i}', 'exec'), {{'__name__': '__main__'}})\n" for i, s in enumerate(snippets)
    )
    return calls + f"print('{{\"ran\": {len(snippets)}}}')\n"


@pytest.mark.parametrize("remote_code", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_every_usage_snippet_runs(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, kind: str, remote_code: bool
) -> None:
    repo = converted_repo(tmp_path_factory, kind, remote_code)
    text = _card(tmp_path_factory, kind, remote_code)
    # the converter rendered the local folder as the repo id; users load the hub repo
    snippets = [s.replace(f'"{repo.name}"', f'"{REPO_IDS[kind]}"') for s in python_snippets(text)]
    # The card shows the original's 50 steps; two run the same code in a fraction of the time.
    snippets = [re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", s) for s in snippets]
    assert snippets and all(REPO_IDS[kind] in s and str(repo) not in s for s in snippets)
    env = offline_env(hub_cache(tmp_path_factory, remote_code), tmp_path / "modules")
    with_plugin = [s for s in snippets if "transformers_viscpm" in s]
    without_plugin = [s for s in snippets if "transformers_viscpm" not in s]
    assert len(without_plugin) == remote_code
    for group, hide in ((with_plugin, False), (without_plugin, True)):
        if group:
            assert run_python(_runner(group), env, tmp_path, hide_plugin=hide) == {"ran": len(group)}
    if kind == "viscpm_paint":
        assert (tmp_path / "viscpm_paint.png").is_file()
