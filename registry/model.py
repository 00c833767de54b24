"""The model as the registry hands it out: the core model plus what only files know about it.

Core stays free of file formats: :class:`LlavakitModel` adds where the weights came from, which parts and
rows are untrained, the processor when one is attached, and :meth:`save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from llavakit.core.errors import StateDictError
from llavakit.core.model import LlavaNextModel

#: The four parts, as named in ``build_model(weights=...)`` and ``model.untrained``.
PARTS: tuple[str, ...] = ("vision", "projector", "tiler", "llm")

#: The config file of a folder saved in the llavakit layout (see docs/checkpoints.md).
LLAVAKIT_CONFIG = "llavakit.json"


class LlavakitModel(LlavaNextModel):
    """A :class:`~llavakit.core.model.LlavaNextModel` that knows its provenance and can save itself.

    - ``source``: the folder, hub id or config file it was loaded from (``None`` when assembled), and
      ``source_folder`` the local folder that held it (a hub snapshot for a hub id).
    - ``untrained``: parts whose weights were initialised rather than loaded (``{"vision", "llm", …}``).
    - ``untrained_rows``: ``{parameter name: (first, end)}`` row ranges added for new tokens (the
      ``<image>``/``<pad>`` rows of a stock LLM), initialised to the mean of the trained rows.
    - ``processor``: the matching processor when the source had one (saved along with the weights).
    """

    def __init__(self, **components):
        super().__init__(**components)
        self.source: str | None = None
        self.source_folder: Path | None = None
        self.untrained: set[str] = set(PARTS)
        self.untrained_rows: dict[str, tuple[int, int]] = {}
        self.processor = None

    def finish_loading(self) -> None:
        """Re-tie shared weights after tensors were assigned one by one, and refuse anything left on meta."""
        llm = self.language_model
        if getattr(getattr(llm, "config", None), "tie_word_embeddings", False):
            llm.lm_head.weight = llm.embed_tokens.weight
        still_meta = [name for name, tensor in self.state_dict().items() if tensor.is_meta]
        if still_meta:
            raise StateDictError(
                f"{len(still_meta)} tensor(s) were never loaded: {', '.join(still_meta[:10])}"
                + ("…" if len(still_meta) > 10 else "")
            )

    def untrained_summary(self) -> str:
        """One line per untrained part or row range, or ``"all weights trained"``."""
        lines = [f"{part}: initialised, not trained" for part in PARTS if part in self.untrained]
        lines += [f"{name}: rows {first}..{end - 1} initialised to the mean row" for name, (first, end) in self.untrained_rows.items()]
        return "\n".join(lines) if lines else "all weights trained"

    def save_pretrained(self, folder: str | Path, *, max_shard_size: int | str = "5GB", layout: str = "auto") -> Path:
        """Write the model to ``folder``; see :func:`llavakit.registry.saving.save_pretrained`."""
        from llavakit.registry.saving import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, layout=layout)
