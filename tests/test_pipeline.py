"""``llavakit.registry.pipeline("image-text-to-text")`` against transformers' pipeline on the same folder.

Images are served over HTTP by a local server on 127.0.0.1, so URL loading and its errors are exercised
without any network.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from llavakit.core.errors import ConfigError, ImageError, ImageFileError
from llavakit.registry import pipeline
from tiny_chat import save_tiny_chat_checkpoint

IMAGE_SIZES = {"wide.png": (240, 420), "tall.png": (500, 200)}


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """``(base URL, folder)`` of a local HTTP server holding the test images."""
    folder = tmp_path_factory.mktemp("served")
    generator = np.random.default_rng(0)
    for name, (height, width) in IMAGE_SIZES.items():
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def no_proxy_for_localhost(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mistral_tokenizer_dir):
    folder = tmp_path_factory.mktemp("pipeline-checkpoint")
    save_tiny_chat_checkpoint(folder, mistral_tokenizer_dir, seed=4)
    return folder


@pytest.fixture(scope="module")
def pipes(checkpoint):
    import transformers

    return pipeline("image-text-to-text", model=str(checkpoint)), transformers.pipeline("image-text-to-text", model=str(checkpoint))


def conversation(*images: dict, question: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", **image} for image in images), {"type": "text", "text": question}]}]


@pytest.mark.parametrize("return_full_text", [False, True])
def test_one_conversation_answers_as_transformers_does(pipes, image_server, return_full_text):
    ours, theirs = pipes
    base, _ = image_server
    chat = conversation({"url": f"{base}/wide.png"})
    expected = theirs(text=chat, max_new_tokens=20, return_full_text=return_full_text)
    result = ours(text=chat, max_new_tokens=20, return_full_text=return_full_text)
    assert result == expected
    reply = result[0]["generated_text"] if not return_full_text else result[0]["generated_text"][-1]["content"]
    assert len(reply) > 10


def test_a_list_of_conversations_gives_a_list_of_lists(pipes, image_server):
    ours, theirs = pipes
    base, _ = image_server
    chats = [
        conversation({"url": f"{base}/wide.png"}),
        conversation({"url": f"{base}/tall.png"}, {"url": f"{base}/wide.png"}, question="Compare them."),
        conversation(question="Say something."),
    ]
    expected = [theirs(text=chat, max_new_tokens=12, return_full_text=False) for chat in chats]
    result = ours(text=chats, max_new_tokens=12, return_full_text=False)  # one left-padded batch
    assert result == expected


def test_images_by_path_by_pil_image_and_by_file_url_agree(pipes, image_server):
    ours, _ = pipes
    base, folder = image_server
    answers = [
        ours(text=conversation(image), max_new_tokens=8, return_full_text=False)[0]["generated_text"]
        for image in ({"url": f"{base}/tall.png"}, {"path": str(folder / "tall.png")},
                      {"image": Image.open(folder / "tall.png")}, {"url": (folder / "tall.png").as_uri()})
    ]
    assert len(set(answers)) == 1


def test_prompt_string_with_images(pipes, image_server):
    ours, _ = pipes
    _, folder = image_server
    prompt = "[INST] <image>\nWhat is this? [/INST]"
    full = ours(Image.open(folder / "wide.png"), text=prompt, max_new_tokens=6)
    new = ours(Image.open(folder / "wide.png"), text=prompt, max_new_tokens=6, return_full_text=False)
    assert full == [{"input_text": prompt, "generated_text": prompt + new[0]["generated_text"]}]


def test_download_errors_name_the_url(pipes, image_server):
    ours, _ = pipes
    base, _ = image_server
    with pytest.raises(ImageFileError, match=f"{base}/missing.png.*404"):
        ours(text=conversation({"url": f"{base}/missing.png"}), max_new_tokens=2)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(ImageFileError, match="could not download"):
        ours(text=conversation({"url": f"http://127.0.0.1:{closed}/x.png"}), max_new_tokens=2)


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "http:///no-host.png", "http://[::1/x.png", "wide.png"])
def test_malformed_urls_are_refused_before_any_work(pipes, url):
    ours, _ = pipes
    with pytest.raises(ImageError, match="message 0"):
        ours(text=conversation({"url": url}), max_new_tokens=2)


def test_unknown_task_and_bad_text_are_refused(pipes):
    ours, _ = pipes
    with pytest.raises(ConfigError, match="image-text-to-text"):
        pipeline("text-generation", model=ours.model)
    with pytest.raises(ConfigError, match="conversation"):
        ours(text=42)


def test_stop_strings_cut_the_reply(pipes, image_server):
    ours, _ = pipes
    base, _ = image_server
    chat = conversation({"url": f"{base}/wide.png"})
    reply = ours(text=chat, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    stop = reply[len(reply) // 2 : len(reply) // 2 + 3]
    cut = ours(text=chat, max_new_tokens=20, return_full_text=False, stop_strings=stop)[0]["generated_text"]
    assert cut == reply.split(stop)[0] and len(cut) < len(reply)
