"""llavakit.plugins: the built-in component implementations.

Each module registers what it provides through hook implementations (``@hookimpl``), exactly like a
third-party plugin; the registry loads the modules listed in :data:`BUILTIN_MODULES`. Plugins import
``llavakit.core`` only, never the registry and never each other's internals.
"""

BUILTIN_MODULES: tuple[str, ...] = (
    "llavakit.plugins.attention",
    "llavakit.plugins.chat_templates",
    "llavakit.plugins.clip_vit",
    "llavakit.plugins.llama",
    "llavakit.plugins.open_clip_vision",
    "llavakit.plugins.projectors",
    "llavakit.plugins.tilers",
)
