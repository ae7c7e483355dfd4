"""The user's cache (sortedcli/cache.py): one absolute place, whatever the current folder, so what is
made once (the project's BPE tokenizer) is reused from every folder instead of retrained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import explain
from sortedcli.cache import cache_dir
from sortedcli.data import lm
from sortedcli.models import decoder


def test_cache_dir_is_sortednet_cache_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SORTEDNET_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sortednet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("llm", "x") == tmp_path / "xdg" / "sortednet" / "llm" / "x"
    monkeypatch.setenv("SORTEDNET_CACHE", "mine")  # relative: taken from where it was said, once
    assert cache_dir("llm") == tmp_path / "mine" / "llm" and cache_dir().is_absolute()
    assert not (tmp_path / "mine").exists()  # finding the place creates nothing


def test_llm_cache_is_in_the_cache_and_the_old_variable_still_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SORTEDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SORTEDNET_LLM_DATA", raising=False)
    assert lm.llm_cache() == tmp_path / "cache" / "llm"
    assert lm.default_tokenizer_dir({}) == tmp_path / "cache" / "llm" / "tokenizer-news-bpe4096"
    monkeypatch.setenv("SORTEDNET_LLM_DATA", "old/llm")
    assert lm.default_tokenizer_dir({"vocab_size": 300}) == tmp_path / "old" / "llm" / "tokenizer-news-bpe300"


def test_the_tokenizer_trained_in_one_folder_is_reused_from_another(tmp_path):
    """`python -m sortedcli.data.prepare` (`make llm-data`) from two folders: one tokenizer, trained once."""
    env = {**os.environ, "SORTEDNET_CACHE": str(tmp_path / "cache"), "SORTEDNET_TOKENIZER_CORPUS": "hamlet",
           "SORTEDNET_VOCAB": "300", "OMP_NUM_THREADS": "1"}
    env.pop("SORTEDNET_LLM_DATA", None)
    folder = tmp_path / "cache" / "llm" / "tokenizer-hamlet-bpe300"
    said, stamps = [], []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        p = subprocess.run([sys.executable, "-m", "sortedcli.data.prepare"], cwd=tmp_path / name, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, explain(p)
        said += [line for line in p.stdout.splitlines() if line.startswith("tokenizer: ")]
        stamps.append((folder / "tokenizer.json").stat().st_mtime_ns)
    assert said == [f"tokenizer: {folder} (300 tokens, trained now)", f"tokenizer: {folder} (300 tokens, cached)"]
    assert stamps[0] == stamps[1]
    assert [p.name for p in (tmp_path / "a").iterdir()] == [] == [p.name for p in (tmp_path / "b").iterdir()]


def test_a_project_tokenizer_named_by_a_missing_folder_comes_from_the_cache(monkeypatch, tmp_path):
    """A run made elsewhere names its tokenizer by that machine's (or folder's) path: here it is the same
    project tokenizer from this user's cache, not one retrained at that path."""
    monkeypatch.setenv("SORTEDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SORTEDNET_LLM_DATA", raising=False)
    cached = lm.load_tokenizer({"tokenizer_corpus": "hamlet", "vocab_size": 300})
    gone = tmp_path / "other-machine" / "data" / "llm" / "tokenizer-hamlet-bpe300"
    tok = decoder.tokenizer({"tokenizer": str(gone)})
    assert Path(tok.name_or_path) == tmp_path / "cache" / "llm" / "tokenizer-hamlet-bpe300"
    assert tok.get_vocab() == cached.get_vocab() and not (tmp_path / "other-machine").exists()
