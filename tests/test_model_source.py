"""Model selection: --hf-repo from the hub cache while offline (nothing is downloaded in tests),
file choice by quant, and clear errors."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from llava_local.cli.main import main
from llava_local.errors import ModelFilesError
from llava_local.runtime.model_source import _pick, find_model


def _fake_hub_cache(root, repo, files: dict):
    """The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap


def test_hf_repo_works_offline_from_the_cache(pair_f32, tmp_path, monkeypatch, sample_png):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-llava-gguf", {
        "tiny-llm-F32.gguf": pair_f32.llm_path, "tiny-mmproj-F32.gguf": pair_f32.mmproj_path})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pair = find_model(hf_repo="someone/tiny-llava-gguf")
    assert pair.llm_path.name == "tiny-llm-F32.gguf" and pair.mmproj_path.name == "tiny-mmproj-F32.gguf"
    res = CliRunner().invoke(main, ["chat", "--hf-repo", "someone/tiny-llava-gguf", "-p", "Hi", "--max-tokens", "2",
                                    str(sample_png)], env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output


def test_hf_repo_not_cached_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="not in the local hub cache"):
        find_model(hf_repo="nobody/nothing")


def test_quant_choice():
    files = ["m-llm-F16.gguf", "m-llm-Q4_K_M.gguf", "m-llm-Q8_0.gguf", "m-mmproj-F16.gguf", "m-mmproj-Q8_0.gguf"]
    assert _pick(files, None) == ("m-llm-Q4_K_M.gguf", "m-mmproj-F16.gguf")
    assert _pick(files, "q8_0")[0] == "m-llm-Q8_0.gguf"
    with pytest.raises(ModelFilesError, match="Q5_K_M"):
        _pick(files, "Q5_K_M")
    with pytest.raises(ModelFilesError, match="mmproj"):
        _pick(["only-llm.gguf"], None)


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "/x"])
def test_bad_repo_names(repo):
    with pytest.raises(ModelFilesError, match="owner/name"):
        find_model(hf_repo=repo)


def test_model_and_hf_repo_together_is_an_error(pair_f32):
    with pytest.raises(ModelFilesError, match="either"):
        find_model(pair_f32.llm_path.parent, hf_repo="a/b")
