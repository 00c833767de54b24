"""Plugin discovery: built-in modules and ``llavakit.plugins`` entry points, through one pluggy manager.

Each plugin is loaded and asked to register in isolation: a plugin that fails to import, or whose hook
raises, is recorded as a :class:`PluginFailure` (distribution, version, error) and the others keep
working. ``LLAVAKIT_STRICT_PLUGINS=1`` turns such failures into errors. ``LLAVAKIT_PLUGINS`` (a comma
separated list of entry-point or distribution names, empty for none) limits which third-party plugins
load; built-ins always load.

Two providers registering one name make that name unusable: resolving it raises an error naming both.
A hook implementation that matches no hookspec (a misspelled hook name) fails its plugin, like an
import error, instead of being silently ignored.

Name families: a plugin may register ``"prefix:*"`` (e.g. ``open_clip:*``) to provide every name
``prefix:<member>``. Resolving ``open_clip:ViT-B-16`` returns the family's spec renamed to that name, with
the member passed as the option ``model_name``; the family's optional ``members`` metadata (a callable
returning the valid member names, called only when such a name is resolved) lets unknown members fail
with the closest match. An exact registration wins over a family.
"""

from __future__ import annotations

import difflib
import importlib
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import pluggy

from llavakit.core import hooks
from llavakit.core.chat import ChatTemplate
from llavakit.core.config import canonical_name
from llavakit.core.errors import ConfigError, DuplicateComponentError, PluginError, UnknownComponentError
from llavakit.plugins import BUILTIN_MODULES

ENTRY_POINT_GROUP = "llavakit.plugins"
BUILTIN_PROVIDER = "llavakit (built-in)"
#: A registered name ending in this suffix provides every ``prefix:<member>`` name.
FAMILY_SUFFIX = ":*"
#: The option through which a family's factory learns which member was asked for.
FAMILY_OPTION = "model_name"

KIND_LABELS = {
    "vision": "vision encoder",
    "llm": "language model",
    "projector": "projector",
    "tiler": "tiler",
    "attention": "attention backend",
    "chat_template": "chat template",
}


@dataclass(frozen=True)
class ComponentSpec:
    """One registered component: how to build it and who provided it."""

    kind: str
    name: str
    factory: Callable[..., Any] | ChatTemplate
    config: type | None
    defaults: dict[str, Any]
    description: str
    provider: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def options(self, overrides: dict[str, Any] | None = None, *, field_path: str | None = None):
        """Validate preset defaults merged with ``overrides`` into the component's config model."""
        values = {**self.defaults, **(overrides or {})}
        if self.config is None:
            if overrides:
                raise ConfigError(f"{field_path or self.kind}: {self.name!r} takes no options, got {sorted(overrides)}")
            return None
        from pydantic import ValidationError

        try:
            return self.config(**values)
        except ValidationError as err:
            where = field_path or self.kind
            problems = "; ".join(
                ".".join([where, "options", *(str(p) for p in e["loc"])]) + f": {e['msg']}" for e in err.errors()
            )
            raise ConfigError(f"invalid options for {KIND_LABELS[self.kind]} {self.name!r}: {problems}") from None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or could not register."""

    plugin: str
    distribution: str
    version: str
    error: str


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin, for ``llavakit plugins``."""

    plugin: str
    distribution: str
    version: str


class PluginRegistry:
    """All components registered by all loaded plugins, by kind and name."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hooks.PROJECT)
        self.manager.add_hookspecs(hooks)
        self.components: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KIND_LABELS}
        self.duplicates: dict[tuple[str, str], list[str]] = {}
        self.failures: list[PluginFailure] = []
        self.plugins: list[PluginInfo] = []
        self._strict = os.environ.get("LLAVAKIT_STRICT_PLUGINS", "") not in ("", "0", "false", "False")

    # ---------------------------------------------------------------------------------- loading
    def load(self) -> PluginRegistry:
        for module_name in BUILTIN_MODULES:
            module = importlib.import_module(module_name)
            self._add(module, module_name, BUILTIN_PROVIDER, _own_version())
        allowed = os.environ.get("LLAVAKIT_PLUGINS")
        allow = None if allowed is None else {a.strip() for a in allowed.split(",") if a.strip()}
        for entry_point in _entry_points():
            dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
            version = entry_point.dist.version if entry_point.dist is not None else "?"
            if allow is not None and entry_point.name not in allow and dist not in allow:
                continue
            try:
                module = entry_point.load()
            except Exception as err:  # noqa: BLE001 - any import failure is the plugin's, recorded below
                self._fail(entry_point.name, dist, version, f"import failed: {type(err).__name__}: {err}", err)
                continue
            self._add(module, entry_point.name, dist, version)
        return self

    def _add(self, module, plugin_name: str, dist: str, version: str) -> None:
        try:
            self.manager.register(module, name=plugin_name)
        except Exception as err:  # noqa: BLE001
            self._fail(plugin_name, dist, version, f"registration failed: {type(err).__name__}: {err}", err)
            return
        try:
            # Every plugin registered before this one passed, so anything pending is this plugin's.
            self.manager.check_pending()
        except pluggy.PluginValidationError as err:
            message = "; ".join(_unknown_hook_message(name) for name in self._unknown_hooks(module))
            self.manager.unregister(module)
            self._fail(plugin_name, dist, version, f"registration failed: {message}", err)
            return
        provider = dist if dist == BUILTIN_PROVIDER else f"{dist} {version}"
        for hook_name, kind in hooks.HOOK_KINDS.items():
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                if impl.plugin is not module:
                    continue
                staged: list[ComponentSpec] = []
                try:
                    impl.function(register=self._register_callback(kind, provider, staged))
                except Exception as err:  # noqa: BLE001
                    self._fail(plugin_name, dist, version, f"{hook_name} raised {type(err).__name__}: {err}", err)
                    continue
                for spec in staged:
                    self._store(spec, plugin_name, dist, version)
        self.plugins.append(PluginInfo(plugin_name, dist, version))

    def _register_callback(self, kind: str, provider: str, staged: list[ComponentSpec]):
        def register(name, factory, *, config=None, defaults=None, description="", **extra):
            if not isinstance(name, str) or not name:
                raise PluginError(f"a {KIND_LABELS[kind]} was registered without a name")
            if name.endswith(FAMILY_SUFFIX) and FAMILY_OPTION not in getattr(config, "model_fields", {}):
                raise PluginError(
                    f"the {KIND_LABELS[kind]} family {name!r} needs a config model with a {FAMILY_OPTION!r} field "
                    "(it receives the member name)"
                )
            staged.append(
                ComponentSpec(
                    kind=kind,
                    name=canonical_name(name),
                    factory=factory,
                    config=config,
                    defaults=dict(defaults or {}),
                    description=description or (getattr(factory, "description", "") if kind == "chat_template" else ""),
                    provider=provider,
                    metadata=extra,
                )
            )

        return register

    def _store(self, spec: ComponentSpec, plugin_name: str, dist: str, version: str) -> None:
        existing = self.components[spec.kind].get(spec.name)
        if existing is None and (spec.kind, spec.name) not in self.duplicates:
            self.components[spec.kind][spec.name] = spec
            return
        providers = self.duplicates.setdefault((spec.kind, spec.name), [existing.provider] if existing else [])
        providers.append(spec.provider)
        self.components[spec.kind].pop(spec.name, None)
        message = (
            f"{KIND_LABELS[spec.kind]} {spec.name!r} is registered by both {providers[0]} and {spec.provider}"
        )
        self._fail(plugin_name, dist, version, message, DuplicateComponentError(message))

    def _fail(self, plugin: str, dist: str, version: str, message: str, err: BaseException) -> None:
        self.failures.append(PluginFailure(plugin, dist, version, message))
        if self._strict:
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            raise PluginError(f"plugin {plugin!r} from {dist} {version}: {message} ({detail})") from err

    # ---------------------------------------------------------------------------------- lookup
    def get(self, kind: str, name: str) -> ComponentSpec:
        """The component ``name`` of ``kind``; unknown or ambiguous names raise with what to do."""
        name = canonical_name(name)
        spec = self.components[kind].get(name)
        if spec is not None:
            return spec
        if (kind, name) in self.duplicates:
            providers = " and ".join(self.duplicates[(kind, name)])
            raise DuplicateComponentError(
                f"{KIND_LABELS[kind]} {name!r} is registered by both {providers}; uninstall one, or limit the "
                "third-party plugins that load with LLAVAKIT_PLUGINS=name1,name2"
            )
        prefix, sep, member = name.partition(":")
        if sep and member and member != "*":
            family_name = prefix + FAMILY_SUFFIX
            if family_name in self.components[kind] or (kind, family_name) in self.duplicates:
                return self._family_member(self.get(kind, family_name), name, member)
        raise UnknownComponentError(KIND_LABELS[kind], name, self.names(kind))

    def _family_member(self, family: ComponentSpec, name: str, member: str) -> ComponentSpec:
        members = family.metadata.get("members")
        if members is not None:
            available = list(members())
            if member not in available:
                prefix = family.name.removesuffix(FAMILY_SUFFIX)
                raise UnknownComponentError(KIND_LABELS[family.kind], name, (f"{prefix}:{m}" for m in available))
        return replace(family, name=name, defaults={**family.defaults, FAMILY_OPTION: member})

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``; a family appears once, as ``prefix:*``."""
        return sorted(self.components[kind])

    def _unknown_hooks(self, module) -> list[str]:
        """Hook implementations of ``module`` that match no hookspec (what ``check_pending`` rejects)."""
        unknown = []
        for hook_name in vars(self.manager.hook):
            caller = getattr(self.manager.hook, hook_name)
            if hook_name.startswith("_") or caller.has_spec():
                continue
            if any(impl.plugin is module and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(hook_name)
        return unknown

    def all(self) -> Iterable[ComponentSpec]:
        for kind in KIND_LABELS:
            yield from (self.components[kind][name] for name in sorted(self.components[kind]))


def _unknown_hook_message(hook_name: str) -> str:
    close = difflib.get_close_matches(hook_name, hooks.HOOK_KINDS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"the hooks are {', '.join(hooks.HOOK_KINDS)}"
    return f"hook implementation {hook_name!r} matches no llavakit hookspec ({hint})"


def _entry_points():
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _own_version() -> str:
    try:
        return metadata.version("llavakit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_REGISTRY: PluginRegistry | None = None


def get_registry(*, reload: bool = False) -> PluginRegistry:
    """The process-wide registry, loaded on first use (``reload=True`` re-reads plugins and the environment)."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = PluginRegistry().load()
    return _REGISTRY
