"""``load_processor(source)``: the processor of a local checkpoint folder, read the way transformers 5 reads it.

A llava-hf folder holds the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, older repos also
``special_tokens_map.json`` / ``added_tokens.json``), the image settings (``preprocessor_config.json`` in
older repos, the ``image_processor`` section of ``processor_config.json`` in transformers >= 5), the
processor settings (``processor_config.json``: ``patch_size``, ``vision_feature_select_strategy``,
``num_additional_image_tokens``) and a chat template (``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``'s ``chat_template``). An original-LLaVA folder ships a SentencePiece
``tokenizer.model`` instead of ``tokenizer.json``: it is converted in memory (needs ``sentencepiece``).

:func:`processor_for_model` builds the processor of an assembled model from a tokenizer source plus the
model's own tiler, token grid and vision normalisation; the LLM preset's chat template is the fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llavakit.core.chat import ChatTemplate
from llavakit.core.errors import CheckpointError, ConfigError, TokenizerError
from llavakit.core.interfaces import ImageTiler
from llavakit.core.processor import Processor, TextTokenizer
from llavakit.core.types import TokenGrid

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
#: transformers' ``PILImageResampling.BICUBIC``: the only resampling the tilers implement.
BICUBIC = 3
#: tokenizer classes that transformers 5 rebuilds around the file's vocabulary (see ``_llama_style``).
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer :func:`load_processor` can read."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config: a string, or a serialised ``AddedToken`` dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# ------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(source: str | Path) -> TextTokenizer:
    """The tokenizer of a folder (``tokenizer.json`` or SentencePiece ``tokenizer.model``), or of a
    ``tokenizer.json`` file, with the settings of ``tokenizer_config.json``."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(source).expanduser()
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise CheckpointError(f"{source}: no such tokenizer folder or tokenizer.json file")
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}
    tokenizer_file = path if path.is_file() else folder / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{tokenizer_file}: not a readable tokenizers file ({err})") from err
        where = str(tokenizer_file)
    elif (folder / "tokenizer.model").is_file():
        backend = convert_sentencepiece(folder / "tokenizer.model", add_prefix_space=config.get("add_prefix_space"),
                                        legacy=config.get("legacy"))
        where = str(folder / "tokenizer.model")
        # transformers' LlamaTokenizer defaults, for the files original LLaVA ships without them.
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", **config}
    else:
        raise CheckpointError(
            f"{folder}: no tokenizer.json or tokenizer.model; pass a folder with the model's tokenizer files"
        )
    if config.get("tokenizer_class") in LLAMA_TOKENIZER_CLASSES and tokenizer_file.is_file():
        _llama_style(backend, add_prefix_space=config.get("add_prefix_space"), legacy=config.get("legacy"))

    def named(key: str) -> str | None:
        return _token_text(config.get(key, special_map.get(key)))

    tokens = {key: named(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    _add_added_tokens(backend, folder, config)
    # Named special tokens missing from the vocabulary are added as special tokens, as transformers does.
    missing = [t for t in tokens.values() if t is not None and backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
    if "add_bos_token" in config or "add_eos_token" in config:
        _set_bos_eos(backend, tokens["bos_token"], tokens["eos_token"], bool(config.get("add_bos_token")),
                     bool(config.get("add_eos_token")))
    padding_side = config.get("padding_side")
    if padding_side not in (None, "left", "right"):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: padding_side {padding_side!r} is not 'left' or 'right'")
    return TextTokenizer(
        backend,
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        unk_token=tokens["unk_token"],
        padding_side=padding_side,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        source=where,
    )


def _add_added_tokens(backend, folder: Path, config: dict[str, Any]) -> None:
    """Tokens listed in ``added_tokens_decoder`` / ``added_tokens.json`` but absent from the backend."""
    from tokenizers import AddedToken

    wanted: dict[int, AddedToken] = {}
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_text(entry)
        if content is not None:
            wanted[int(index)] = AddedToken(
                content, special=bool(entry.get("special", True)), normalized=bool(entry.get("normalized", False)),
                lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
            )
    for content, index in (_read_json(folder / "added_tokens.json") or {}).items():
        wanted.setdefault(int(index), AddedToken(content, special=True, normalized=False))
    for index in sorted(wanted):
        token = wanted[index]
        found = backend.token_to_id(token.content)
        if found is None:
            if backend.get_vocab_size(with_added_tokens=True) != index:
                raise TokenizerError(
                    f"{folder}: the added token {token.content!r} should have id {index} but the vocabulary has "
                    f"{backend.get_vocab_size(with_added_tokens=True)} tokens; the tokenizer files disagree"
                )
            backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
        elif found != index:
            raise TokenizerError(
                f"{folder}: the token {token.content!r} has id {found} in the tokenizer but {index} in "
                "tokenizer_config.json/added_tokens.json; the tokenizer files disagree"
            )


def _llama_style(backend, *, add_prefix_space: bool | None, legacy: bool | None) -> None:
    """transformers 5 reads a Llama-class ``tokenizer.json`` for its vocabulary and merges only and rebuilds the
    rest: no normaliser, a ``Metaspace`` pre-tokeniser (``▁`` prepended to the first segment, or to every segment
    after a special token with ``legacy=true``) and the matching decoder. Reproduce that, so token ids match."""
    from tokenizers import decoders, pre_tokenizers

    prefix = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if legacy else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _set_bos_eos(backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """The post-processor transformers builds from ``add_bos_token`` / ``add_eos_token``."""
    from tokenizers import processors

    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(t, backend.token_to_id(t)) for t, used in ((bos, add_bos), (eos, add_eos)) if used]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def convert_sentencepiece(model_file: Path, *, add_prefix_space: bool | None = None, legacy: bool | None = None):
    """A ``tokenizers`` BPE tokenizer equivalent to a SentencePiece BPE ``tokenizer.model`` (Llama/Mistral style),
    built as transformers 5 converts it: the pieces as vocabulary, merges ranked by the merged piece's id,
    byte fallback, control pieces as special tokens and user-defined pieces as plain added tokens."""
    try:
        import sentencepiece as spm
    except ImportError as err:
        raise TokenizerError(
            f"{model_file}: reading a SentencePiece tokenizer.model needs the sentencepiece package "
            "(pip install sentencepiece), or ship a tokenizer.json"
        ) from err
    from tokenizers import AddedToken, Tokenizer, models

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{model_file}: not a readable SentencePiece model ({err})") from err
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=sentencepiece_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    added = [
        AddedToken(pieces[index], special=special, normalized=False)
        for index, special in _sentencepiece_added_pieces(sp, Path(model_file))
    ]
    for token in added:
        backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
    _llama_style(backend, add_prefix_space=add_prefix_space, legacy=legacy)
    return backend


#: SentencePiece piece types (sentencepiece_model.proto): control pieces are special added tokens,
#: user-defined pieces plain added tokens.
SPM_CONTROL, SPM_USER_DEFINED = 3, 4


def _sentencepiece_added_pieces(sp, model_file: Path) -> list[tuple[int, bool]]:
    """``(id, special)`` of the control and user-defined pieces; without protobuf, the control pieces only."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return [(index, True) for index in range(sp.get_piece_size()) if sp.is_control(index)]
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return [
        (index, piece.type == SPM_CONTROL)
        for index, piece in enumerate(proto.pieces)
        if piece.type in (SPM_CONTROL, SPM_USER_DEFINED)
    ]


def sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces, ranked by the
    merged piece's id, then by the lengths and ids of the halves (transformers' ``generate_merges``)."""
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:i], piece[i:], rank) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


# ------------------------------------------------------------------------------------------ images
def read_image_settings(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The image processor settings and the file they came from, or ``None`` if the folder has none."""
    preprocessor = _read_json(folder / "preprocessor_config.json")
    if preprocessor is not None:
        return preprocessor, folder / "preprocessor_config.json"
    processor = _read_json(folder / "processor_config.json") or {}
    nested = processor.get("image_processor")
    if isinstance(nested, dict):
        return nested, folder / "processor_config.json"
    return None


def _side(value: Any) -> int | None:
    """A square side from transformers' size dicts (``{"height", "width"}`` or ``{"shortest_edge"}``) or an int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                return None
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def image_normalisation(settings: dict[str, Any], where: Path) -> dict[str, Any]:
    """Processor keyword arguments (mean, std, rescale) from image settings, refusing ones we do not implement."""
    resample = settings.get("resample", BICUBIC)
    if resample != BICUBIC:
        raise ConfigError(f"{where}: resample={resample!r} is not supported; the tilers resize with BICUBIC (3)")
    if settings.get("do_convert_rgb") is False:
        raise ConfigError(f"{where}: do_convert_rgb=false is not supported; images are always converted to RGB")
    normalise = settings.get("do_normalize", True)
    rescale = settings.get("do_rescale", True)
    return {
        "image_mean": tuple(settings.get("image_mean", (0.0, 0.0, 0.0))) if normalise else (0.0, 0.0, 0.0),
        "image_std": tuple(settings.get("image_std", (1.0, 1.0, 1.0))) if normalise else (1.0, 1.0, 1.0),
        "rescale_factor": float(settings.get("rescale_factor", 1 / 255)) if rescale else 1.0,
    }


def _check_tiling(tiler: ImageTiler, settings: dict[str, Any], where: Path) -> None:
    """The folder's image settings must describe the tiling the model's tiler does."""
    side = _side(settings.get("crop_size")) or _side(settings.get("size"))
    if side is not None and side != tiler.tile_size:
        raise ConfigError(
            f"{where}: images are cut into {side}-pixel tiles but the model's vision encoder takes "
            f"{tiler.tile_size}-pixel ones; the folder's files disagree"
        )
    pinpoints = settings.get("image_grid_pinpoints")
    model_pinpoints = getattr(tiler, "grid_pinpoints", None)
    if pinpoints is not None and model_pinpoints is not None:
        if [tuple(p) for p in pinpoints] != [tuple(p) for p in model_pinpoints]:
            raise ConfigError(
                f"{where}: image_grid_pinpoints {pinpoints} differ from the model's {list(model_pinpoints)} "
                "(config.json); the image token counts would not match the model"
            )


def _check_processor_settings(processor_config: dict[str, Any], where: Path) -> None:
    """transformers counts ``num_additional_image_tokens`` minus one for ``default``: it must net out to zero."""
    strategy = processor_config.get("vision_feature_select_strategy")
    extra = processor_config.get("num_additional_image_tokens")
    if strategy is None or extra is None:
        return
    net = int(extra) - (1 if strategy == "default" else 0)
    if net != 0:
        raise ConfigError(
            f"{where}: vision_feature_select_strategy={strategy!r} with num_additional_image_tokens={extra} adds "
            f"{net:+d} token(s) per image to what the model produces; llavakit models use the patch grid only"
        )


# ------------------------------------------------------------------------------------------ templates
def read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> ChatTemplate | None:
    """The folder's own chat template (``chat_template.jinja``, ``chat_template.json``, tokenizer_config)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(name=f"{folder.name} (chat_template.jinja)", source=jinja.read_text(encoding="utf-8"))
    data = _read_json(folder / "chat_template.json")
    if data is not None and isinstance(data.get("chat_template"), str):
        return ChatTemplate(name=f"{folder.name} (chat_template.json)", source=data["chat_template"])
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if isinstance(source, str):
        return ChatTemplate(name=f"{folder.name} (tokenizer_config.json)", source=source)
    return None


def builtin_chat_template(llm_name: str | None) -> ChatTemplate | None:
    """The chat template an LLM preset names in its metadata, if any."""
    from llavakit.registry.plugins import get_registry

    if llm_name is None:
        return None
    registry = get_registry()
    try:
        spec = registry.get("llm", llm_name)
    except ConfigError:
        return None
    name = spec.metadata.get("chat_template")
    return registry.get("chat_template", name).factory if name else None


# ------------------------------------------------------------------------------------------ processors
def load_processor(
    source: str | Path,
    *,
    model=None,
    image_token_index: int | None = None,
    padding_side: str | None = None,
    chat_template: ChatTemplate | str | None = None,
) -> Processor:
    """The processor of a checkpoint folder or hub id (llava-hf layout, either transformers generation, or an
    original-LLaVA folder with ``tokenizer.model``).

    The tiler and token grid come from ``model`` when given (``load_model`` passes itself), else from the
    folder's ``config.json``, else from its image and processor settings. ``image_token_index`` defaults to
    the model's or config.json's ``image_token_index``; an original-LLaVA tokenizer without ``<image>`` gets it
    added at that id (which must be the next free one). The checks refuse, naming the ids found, an image
    token that maps elsewhere, and bos/eos/pad tokens missing from the vocabulary or colliding.
    """
    folder = _local(source, patterns=("config.json",))
    if folder.is_file():
        folder = folder.parent
    if not has_tokenizer_files(folder):
        raise CheckpointError(f"{source}: no tokenizer.json or tokenizer.model in this folder")
    tokenizer_config = _read_json(folder / "tokenizer_config.json") or {}
    processor_config = _read_json(folder / "processor_config.json") or {}
    hf_config = _read_json(folder / "config.json") or {}
    image_settings = read_image_settings(folder)
    extra_tokens = tokenizer_config.get("extra_special_tokens")
    image_token = (
        processor_config.get("image_token")
        or _token_text(tokenizer_config.get("image_token"))
        or (_token_text(extra_tokens.get("image_token")) if isinstance(extra_tokens, dict) else None)
        or "<image>"
    )
    if image_token_index is None:
        image_token_index = getattr(model, "image_token_index", None)
    if image_token_index is None:
        image_token_index = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    tokenizer = load_tokenizer(folder)

    if model is not None:
        tiler, grid = model.tiler, model.token_grid
        llm_name = model.config.llm.name
    else:
        tiler, grid, llm_name = _tiling_from_files(folder, hf_config, image_settings, processor_config)
    if image_settings is not None:
        settings, where = image_settings
        _check_tiling(tiler, settings, where)
        normalisation = image_normalisation(settings, where)
    elif model is not None:
        normalisation = {"image_mean": model.vision_tower.image_mean, "image_std": model.vision_tower.image_std}
    else:
        raise CheckpointError(
            f"{folder}: no image settings (preprocessor_config.json, or processor_config.json with an "
            "image_processor section); load the processor with its model instead"
        )
    _check_processor_settings(processor_config, folder / "processor_config.json")
    template = _resolve_template(chat_template) or read_chat_template(folder, tokenizer_config) or builtin_chat_template(llm_name)
    return make_processor(
        tokenizer, tiler, grid, image_token=image_token, image_token_index=image_token_index,
        chat_template=template, padding_side=padding_side, pad_token_id=_config_pad_id(hf_config), **normalisation,
    )


def processor_for_model(model, tokenizer_source: str | Path, *, chat_template: ChatTemplate | str | None = None) -> Processor:
    """The processor of an assembled model: a tokenizer folder (or ``tokenizer.json``) plus the model's tiler,
    token grid and vision normalisation; the folder's chat template, else the LLM preset's."""
    path = _local(tokenizer_source)
    folder = path.parent if path.is_file() else path
    tokenizer_config = (_read_json(folder / "tokenizer_config.json") or {}) if folder.is_dir() else {}
    tokenizer = load_tokenizer(path)
    spec = getattr(model, "component_specs", {}).get("llm")
    pad_id = spec.metadata.get("pad_token_id") if spec is not None else None
    template = (
        _resolve_template(chat_template)
        or (read_chat_template(folder, tokenizer_config) if folder.is_dir() else None)
        or builtin_chat_template(model.config.llm.name)
    )
    return make_processor(
        tokenizer, model.tiler, model.token_grid, image_token="<image>", image_token_index=model.image_token_index,
        chat_template=template, padding_side=None, pad_token_id=pad_id,
        image_mean=model.vision_tower.image_mean, image_std=model.vision_tower.image_std,
    )


def _local(source: str | Path, *, patterns: tuple[str, ...] = ()) -> Path:
    """A local path, or the processor files of a hub id (``owner/name[@revision]``) downloaded to the cache."""
    from llavakit.registry import hub

    return hub.resolve_source(source, patterns=(*hub.PROCESSOR_FILES, *patterns))


def make_processor(
    tokenizer: TextTokenizer,
    tiler: ImageTiler,
    grid: TokenGrid,
    *,
    image_token: str,
    image_token_index: int | None,
    chat_template: ChatTemplate | None,
    padding_side: str | None,
    pad_token_id: int | None = None,
    **normalisation: Any,
) -> Processor:
    """Check the tokenizer against the model's ids, add what an original-LLaVA tokenizer lacks, build."""
    from tokenizers import AddedToken

    found = tokenizer.token_to_id(image_token)
    if found is None and image_token_index is not None and image_token_index == len(tokenizer):
        tokenizer.backend.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
        found = tokenizer.token_to_id(image_token)
    if found is None or (image_token_index is not None and found != image_token_index):
        where = "is missing from the vocabulary" if found is None else f"has id {found}"
        raise TokenizerError(
            f"{tokenizer.source}: the image token {image_token!r} {where}, but the model's image_token_index is "
            f"{image_token_index}; use the tokenizer the checkpoint was trained with (the 34B's <image> id changed "
            "between tokenizer versions)"
        )
    check_special_tokens(tokenizer, image_token_id=found, pad_token_id=pad_token_id)
    return Processor(
        tokenizer, tiler, grid, image_token=image_token, image_token_id=found, chat_template=chat_template,
        padding_side=padding_side, **normalisation,
    )


def check_special_tokens(tokenizer: TextTokenizer, *, image_token_id: int, pad_token_id: int | None = None) -> None:
    """bos/eos/pad must be in the vocabulary, differ from the image token, and pad must be the model's ``pad_token_id``."""
    ids = {name: tokenizer.token_to_id(getattr(tokenizer, name)) for name in ("bos_token", "eos_token", "pad_token")}
    listing = ", ".join(f"{name}={getattr(tokenizer, name)!r} (id {ids[name]})" for name in ids) + f", image={image_token_id}"
    for name, token_id in ids.items():
        if getattr(tokenizer, name) is not None and token_id is None:
            raise TokenizerError(f"{tokenizer.source}: {name} {getattr(tokenizer, name)!r} is not in the vocabulary ({listing})")
        if token_id is not None and token_id == image_token_id:
            raise TokenizerError(f"{tokenizer.source}: {name} has the image token's id {image_token_id} ({listing})")
    if pad_token_id is not None and ids["pad_token"] is not None and ids["pad_token"] != pad_token_id:
        raise TokenizerError(
            f"{tokenizer.source}: pad_token {tokenizer.pad_token!r} has id {ids['pad_token']} but the model config says "
            f"pad_token_id={pad_token_id} ({listing})"
        )


def _config_pad_id(hf_config: dict[str, Any]) -> int | None:
    text = hf_config.get("text_config") or {}
    value = hf_config.get("pad_token_id", text.get("pad_token_id"))
    return value if isinstance(value, int) else None


def _resolve_template(template: ChatTemplate | str | None) -> ChatTemplate | None:
    if template is None or isinstance(template, ChatTemplate):
        return template
    from llavakit.registry.plugins import get_registry

    if "{" in template:  # Jinja source rather than a registered name
        return ChatTemplate(name="custom", source=template)
    return get_registry().get("chat_template", template).factory


def _tiling_from_files(
    folder: Path, hf_config: dict[str, Any], image_settings: tuple[dict[str, Any], Path] | None,
    processor_config: dict[str, Any],
) -> tuple[ImageTiler, TokenGrid, str | None]:
    """A tiler (on the meta device: it only counts and cuts) and token grid described by the folder's files."""
    from llavakit.registry.plugins import get_registry

    llm_name = None
    if hf_config.get("model_type") == "llava_next":
        from llavakit.registry.hf_config import from_llava_next

        config = from_llava_next(hf_config, where=str(folder / "config.json"))
        vision = get_registry().get("vision", config.vision.name).options(config.vision.options, field_path="vision")
        tile_size, patch_size = vision.image_size, vision.patch_size
        pinpoints = config.tiler.options.get("grid_pinpoints")
        llm_name = config.llm.name
    elif image_settings is not None:
        settings, where = image_settings
        tile_size = _side(settings.get("crop_size")) or _side(settings.get("size"))
        patch_size = processor_config.get("patch_size")
        pinpoints = settings.get("image_grid_pinpoints")
        if tile_size is None or patch_size is None:
            raise CheckpointError(
                f"{folder}: without config.json the tile size (crop_size in {where.name}) and patch_size "
                "(processor_config.json) must both be given"
            )
    else:
        raise CheckpointError(f"{folder}: no config.json and no image settings to build the processor from")
    spec = get_registry().get("tiler", "anyres")
    options = {"tile_size": tile_size, **({"grid_pinpoints": [tuple(p) for p in pinpoints]} if pinpoints else {})}
    with torch.device("meta"):
        tiler = spec.factory(spec.options(options, field_path="tiler"))
    side = tile_size // patch_size
    return tiler, TokenGrid(side, side), llm_name
