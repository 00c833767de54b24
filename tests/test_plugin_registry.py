"""Plugin isolation: third-party plugins found through real ``llavakit.plugins`` entry points of real
(temporary) distributions; broken, duplicate and misspelled plugins are reported with their distribution
while everything else keeps working."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import llavakit.registry.plugins as registry_plugins
from llavakit.core.errors import DuplicateComponentError, PluginError, UnknownComponentError
from llavakit.registry import build_model
from llavakit.registry.cli import main

HEADER = "from llavakit.core.hooks import hookimpl\n"

GOOD = HEADER + textwrap.dedent(
    """
    from pydantic import BaseModel

    class AcmeConfig(BaseModel):
        model_name: str
        width: int = 8

    def acme_factory(config, attention=None):
        return config

    @hookimpl
    def register_vision_encoders(register):
        register("good-vit", acme_factory, description="a well-behaved plugin's encoder")
        register("acme:*", acme_factory, config=AcmeConfig, description="acme family",
                 members=lambda: ["small", "large"])
    """
)
BROKEN = "import llavakit_missing_dependency  # noqa: F401\n"
DUPLICATE = HEADER + textwrap.dedent(
    """
    @hookimpl
    def register_vision_encoders(register):
        register("clip-l336", object, description="a second clip-l336")
    """
)
MISSPELLED = HEADER + textwrap.dedent(
    """
    @hookimpl
    def register_vision_encoder(register):
        register("typo-vit", object)

    @hookimpl
    def register_projectors(register):
        register("typo-proj", object)
    """
)
RAISING = HEADER + textwrap.dedent(
    """
    @hookimpl
    def register_projectors(register):
        raise RuntimeError("projector table is corrupt")
    """
)
FAMILY_WITHOUT_OPTION = HEADER + textwrap.dedent(
    """
    @hookimpl
    def register_vision_encoders(register):
        register("nomember:*", object)
    """
)
FAMILY_CLASH = HEADER + textwrap.dedent(
    """
    from pydantic import BaseModel, ConfigDict

    class Options(BaseModel):
        model_config = ConfigDict(protected_namespaces=())
        model_name: str

    @hookimpl
    def register_vision_encoders(register):
        register("open_clip:*", object, config=Options)
    """
)

#: distribution name -> (version, module name, source)
DISTRIBUTIONS = {
    "llavakit-good-plugin": ("1.2.0", "good_plugin", GOOD),
    "llavakit-broken-plugin": ("0.3.0", "broken_plugin", BROKEN),
    "llavakit-dup-plugin": ("2.0.0", "dup_plugin", DUPLICATE),
    "llavakit-typo-plugin": ("0.1.0", "typo_plugin", MISSPELLED),
    "llavakit-raising-plugin": ("0.0.1", "raising_plugin", RAISING),
    "llavakit-nomember-plugin": ("1.0.0", "nomember_plugin", FAMILY_WITHOUT_OPTION),
    "llavakit-clash-plugin": ("3.1.0", "clash_plugin", FAMILY_CLASH),
}


def write_distribution(root: Path, dist: str, version: str, module: str, source: str) -> None:
    """An installed distribution as pip leaves it: the module plus ``*.dist-info`` with the entry point."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[llavakit.plugins]\n{module.removesuffix('_plugin')} = {module}\n")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install the named fake distributions on ``sys.path``; return a function that loads a fresh registry."""

    def install(*dists: str):
        for dist in dists:
            version, module, source = DISTRIBUTIONS[dist]
            write_distribution(tmp_path, dist, version, module, source)
        monkeypatch.syspath_prepend(str(tmp_path))
        return registry_plugins.get_registry(reload=True)

    # The process-wide registry is restored after the test; the fake modules are forgotten.
    monkeypatch.setattr(registry_plugins, "_REGISTRY", None)
    monkeypatch.delenv("LLAVAKIT_PLUGINS", raising=False)
    monkeypatch.delenv("LLAVAKIT_STRICT_PLUGINS", raising=False)
    yield install
    for _, module, _ in DISTRIBUTIONS.values():
        sys.modules.pop(module, None)


def failure_of(registry, dist: str):
    (failure,) = [f for f in registry.failures if f.distribution == dist]
    return failure


def test_broken_and_duplicate_plugins_are_reported_while_the_rest_works(installed, capsys):
    registry = installed("llavakit-good-plugin", "llavakit-broken-plugin", "llavakit-dup-plugin")

    broken = failure_of(registry, "llavakit-broken-plugin")
    assert broken.version == "0.3.0" and broken.plugin == "broken"
    assert "import failed: ModuleNotFoundError" in broken.error and "llavakit_missing_dependency" in broken.error
    duplicate = failure_of(registry, "llavakit-dup-plugin")
    assert "'clip-l336' is registered by both llavakit (built-in) and llavakit-dup-plugin 2.0.0" in duplicate.error

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken (llavakit-broken-plugin 0.3.0): import failed: ModuleNotFoundError" in out
    assert "The other plugins work. LLAVAKIT_STRICT_PLUGINS=1 makes such failures raise" in out
    assert "dup (llavakit-dup-plugin 2.0.0)" in out and "Unusable names (registered twice): vision encoder 'clip-l336'" in out
    assert "good-vit" in out and "llavakit-good-plugin 1.2.0" in out

    with pytest.raises(DuplicateComponentError, match="llavakit \\(built-in\\) and llavakit-dup-plugin 2.0.0"):
        build_model(vision="clip-l336", llm="mistral-7b", device="meta")
    # Everything not involved keeps working: the built-ins and the good plugin.
    model = build_model(vision="clip-vit", llm="mistral-7b", device="meta")
    assert model.vision_tower.num_layers == 12
    assert registry.get("vision", "good-vit").provider == "llavakit-good-plugin 1.2.0"


def test_strict_mode_raises_with_the_distribution(installed, monkeypatch):
    monkeypatch.setenv("LLAVAKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'broken' from llavakit-broken-plugin 0.3.0: import failed"):
        installed("llavakit-good-plugin", "llavakit-broken-plugin")


def test_allow_list_limits_what_loads(installed, monkeypatch, capsys):
    monkeypatch.setenv("LLAVAKIT_PLUGINS", "llavakit-good-plugin")
    registry = installed("llavakit-good-plugin", "llavakit-broken-plugin", "llavakit-dup-plugin")
    assert registry.failures == []
    assert "broken_plugin" not in sys.modules and "dup_plugin" not in sys.modules
    assert registry.get("vision", "good-vit") and registry.get("vision", "clip-l336").provider == "llavakit (built-in)"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "limited to LLAVAKIT_PLUGINS='llavakit-good-plugin'" in out and "Failed plugins: none" in out

    monkeypatch.setenv("LLAVAKIT_PLUGINS", "broken")  # entry-point names work too
    registry = registry_plugins.get_registry(reload=True)
    assert [f.distribution for f in registry.failures] == ["llavakit-broken-plugin"]
    assert "good-vit" not in registry.names("vision")

    monkeypatch.setenv("LLAVAKIT_PLUGINS", "")  # built-ins only
    registry = registry_plugins.get_registry(reload=True)
    assert registry.failures == [] and "good-vit" not in registry.names("vision")
    assert {p.distribution for p in registry.plugins} == {registry_plugins.BUILTIN_PROVIDER}


def test_misspelled_hook_fails_its_plugin_only(installed):
    registry = installed("llavakit-good-plugin", "llavakit-typo-plugin")
    typo = failure_of(registry, "llavakit-typo-plugin")
    assert "'register_vision_encoder' matches no llavakit hookspec (did you mean 'register_vision_encoders'?)" in typo.error
    # The plugin is rejected as a whole: its correctly spelled hook does not half-register it.
    assert "typo-proj" not in registry.names("projector") and "typo-vit" not in registry.names("vision")
    assert "good-vit" in registry.names("vision")


def test_a_raising_hook_is_recorded(installed):
    registry = installed("llavakit-raising-plugin", "llavakit-good-plugin")
    failure = failure_of(registry, "llavakit-raising-plugin")
    assert "register_projectors raised RuntimeError: projector table is corrupt" in failure.error
    assert "mlp2x-gelu" in registry.names("projector")


def test_unknown_names_list_alternatives_and_closest_match(installed):
    registry = installed("llavakit-good-plugin")
    with pytest.raises(UnknownComponentError) as info:
        registry.get("vision", "clip-l33")
    message = str(info.value)
    assert "Did you mean 'clip-l336'?" in message
    assert "clip-vit" in message and "good-vit" in message and "open_clip:*" in message
    with pytest.raises(UnknownComponentError, match="unknown projector 'mlp2x-gleu'. Did you mean 'mlp2x-gelu'"):
        build_model(vision="clip-l336", llm="mistral-7b", projector="mlp2x_gleu", device="meta")


def test_name_families_pass_the_member_and_check_it(installed):
    registry = installed("llavakit-good-plugin")
    spec = registry.get("vision", "acme:large")
    assert spec.name == "acme:large" and spec.options().model_name == "large"
    assert spec.options({"width": 3}).width == 3
    with pytest.raises(UnknownComponentError, match="unknown vision encoder 'acme:smal'. Did you mean 'acme:small'"):
        registry.get("vision", "acme:smal")
    with pytest.raises(UnknownComponentError):
        registry.get("vision", "nobody:small")


def test_family_needs_a_member_option_and_cannot_be_claimed_twice(installed):
    registry = installed("llavakit-nomember-plugin", "llavakit-clash-plugin")
    assert "needs a config model with a 'model_name' field" in failure_of(registry, "llavakit-nomember-plugin").error
    with pytest.raises(DuplicateComponentError, match="'open_clip:\\*' is registered by both llavakit \\(built-in\\) and "
                       "llavakit-clash-plugin 3.1.0"):
        registry.get("vision", "open_clip:ViT-B-16")
