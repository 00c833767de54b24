"""llavakit-example-plugin: the module named by the ``llavakit.plugins`` entry point.

llavakit imports this module and calls the hook implementations below with a ``register`` callback.
Registering is cheap (no model is built here); the factories run when a model is assembled.
Names carry the plugin's own prefix (``example-``) so they cannot collide with llavakit's or another
plugin's.
"""

from llavakit.core.hooks import hookimpl

from llavakit_example_plugin.resampler import PerceiverResampler, ResamplerConfig
from llavakit_example_plugin.tiny_vit import TinyVit, TinyVitConfig

__version__ = "0.1.0"


@hookimpl
def register_vision_encoders(register):
    register(
        "example-tiny-vit",
        TinyVit,
        config=TinyVitConfig,
        description="example plugin: ViT-Tiny-style encoder with a class token (llavakit attention)",
    )


@hookimpl
def register_projectors(register):
    register(
        "example-resampler",
        PerceiverResampler,
        config=ResamplerConfig,
        description="example plugin: perceiver resampler emitting a fixed 8x8 token grid per tile",
    )
