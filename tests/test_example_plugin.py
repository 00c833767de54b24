"""The third-party example plugin (``docs/examples/llavakit-example-plugin``) installed with pip into a
temporary virtual environment, as a user would: ``llavakit plugins`` lists it with its distribution and
version, and its own test suite (entry-point discovery, contract shapes, the resampler's 8x8 grid driving
the token count, forward and generate) passes there."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "llavakit-example-plugin"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory) -> Path:
    """A fresh venv that sees this environment's packages (llavakit, torch …) and has the example installed.

    ``--system-site-packages`` would expose the *base* interpreter's packages, not this venv's, so the
    current site directories are added with a ``.pth`` file instead; nothing is downloaded (``--no-deps``,
    ``--no-build-isolation``). The example is copied first so the build leaves no files in the repository.
    """
    root = tmp_path_factory.mktemp("plugin-venv")
    environment = root / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    parent_sites = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "llavakit-parent-env.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in parent_sites if Path(path).is_dir())
    )
    source = shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)])
    return python


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LLAVAKIT_", "PYTHONPATH"))}


def test_example_is_not_installed_in_the_test_environment_itself():
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("llavakit-example-plugin")


def test_llavakit_plugins_lists_it_with_distribution_and_version(plugin_python):
    out = run([str(plugin_python), "-m", "llavakit.registry.cli", "plugins"], env=clean_env()).stdout
    assert "example                              llavakit-example-plugin 0.1.0" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  example-")}
    assert "llavakit-example-plugin 0.1.0" in lines["example-tiny-vit"]
    assert "llavakit-example-plugin 0.1.0" in lines["example-resampler"]
    assert "Failed plugins: none" in out


def test_the_plugins_own_suite_passes_installed(plugin_python, tmp_path):
    tests = shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    result = run([str(plugin_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                 env=clean_env(), cwd=tmp_path)
    assert "5 passed" in result.stdout, result.stdout

