"""Hugging Face Hub sources: ``owner/name`` (optionally ``owner/name@revision``) → a local snapshot folder.

Local paths are returned as they are and never touch the network. Hub ids go through
``huggingface_hub.snapshot_download`` with only the files the caller needs (``allow_patterns``), a pinned
revision when one is given, and ``HF_HUB_OFFLINE=1`` honoured (only the local cache is used then).
``huggingface_hub`` is imported on first use, never at ``import llavakit.registry``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from llavakit.core.errors import CheckpointError

#: What a model folder needs: its config and safetensors weights (single file or shards with an index).
MODEL_FILES: tuple[str, ...] = ("config.json", "*.safetensors", "*.safetensors.index.json", "llavakit.json")
#: Pickle weights, fetched only when the caller allowed pickle files.
PICKLE_FILES: tuple[str, ...] = ("*.bin", "*.bin.index.json")
#: Tokenizer, image-processor and chat-template files of a llava-hf folder.
PROCESSOR_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
#: open_clip hub repos: their own config and weight file names.
OPEN_CLIP_FILES: tuple[str, ...] = ("open_clip_config.json", "open_clip_model.safetensors")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def split_revision(source: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → ``("owner/name", "rev")``; without ``@``, the revision is ``None``."""
    repo, sep, revision = source.partition("@")
    return repo, (revision or None) if sep else None


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as a hub id (``owner/name[@revision]``) rather than an existing local path."""
    text = str(source)
    return not Path(text).expanduser().exists() and bool(_HUB_ID.match(text))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(
    source: str | os.PathLike, *, patterns: Sequence[str], revision: str | None = None
) -> Path:
    """A local folder (or file) for ``source``: the path itself, or a hub snapshot holding ``patterns``.

    ``revision`` (a branch, tag or commit) pins the snapshot; ``owner/name@rev`` does the same inline.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such file or folder, and not a hub id (owner/name[@revision])")
    repo, inline_revision = split_revision(text)
    if inline_revision and revision and inline_revision != revision:
        raise CheckpointError(f"{text}: revision {inline_revision!r} in the id conflicts with revision={revision!r}")
    return download(repo, revision=inline_revision or revision, patterns=patterns)


def download(repo: str, *, revision: str | None, patterns: Sequence[str]) -> Path:
    """``snapshot_download`` of ``patterns`` from ``repo``, with errors that say what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        folder = huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=list(patterns), local_files_only=offline()
        )
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo}: revision {revision!r} does not exist on the hub") from None
    except errors.GatedRepoError:  # a subclass of RepositoryNotFoundError: caught first
        raise CheckpointError(f"{repo}: is gated; accept its licence on the hub and log in with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo}: no such repository on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo}: not in the local Hugging Face cache"
            + (" and HF_HUB_OFFLINE is set; unset it to download, or pass a local folder" if offline() else
               "; the hub could not be reached, so pass a local folder or retry online")
        ) from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"{repo}: download failed ({type(err).__name__}: {err})") from None
    return Path(folder)
