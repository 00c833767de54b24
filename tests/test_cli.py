"""The ``llavakit`` command line: --version, plugins, inspect."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llavakit.registry.cli import main
from tiny import save_tiny_llava_hf


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("llavakit ")


def test_plugins_lists_every_kind_with_provider(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("clip-l336", "mistral-7b", "hermes-yi-34b", "mlp2x-gelu", "anyres", "single", "eager", "sdpa", "flash"):
        assert name in out
    assert "llavakit (built-in)" in out and "Failed plugins" in out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-cli")
    save_tiny_llava_hf(folder, "llama-gqa")
    return folder


def test_inspect_reports_components_memory_and_image_tokens(capsys, tiny_folder):
    assert main(["inspect", str(tiny_folder), "--image-size", "768x1024"]) == 0
    out = capsys.readouterr().out
    assert "clip-vit" in out and "mlp2x-gelu" in out and "anyres" in out
    assert "2340 image tokens" in out and "grid 2x2" in out
    assert "bfloat16" in out and "KiB" in out


def test_inspect_presets_through_a_config_file(capsys, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("vision: clip-l336\nllm: mistral-7b\n")
    assert main(["inspect", str(config), "--image-size", "1000x100"]) == 0
    out = capsys.readouterr().out
    assert "7,566,747,648" in out and "1224 image tokens" in out and "14.09 GiB" in out


def test_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llavakit.registry.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "no such file or folder" in result.stderr and "Traceback" not in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "llavakit.registry.cli", "inspect", str(tmp_path), "--image-size", "wide"],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "HEIGHTxWIDTH" in bad.stderr


def test_inspect_reads_an_original_llava_folder_without_weights(capsys, tmp_path):
    from tiny import save_original_llava

    save_original_llava(tmp_path / "orig", "llama-mha")
    assert main(["inspect", str(tmp_path / "orig"), "--image-size", "336x336"]) == 0
    out = capsys.readouterr().out
    assert "clip-vit" in out and "1176 image tokens" in out
