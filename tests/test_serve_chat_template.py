"""Which stop strings a folder's chat template brings to the server's chat endpoint."""

import json

import pytest

pytest.importorskip("jinja2")

from ham_mlx.hf_tokenizer import CHAT_TEMPLATE  # noqa: E402
from ham_mlx.model_io import default_model_path  # noqa: E402
from ham_mlx.serve.chat import BUILTIN_STOP, load_chat_template  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello"}]


def folder_with(tmp_path, template: str | None):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_template_ham_mlx_writes_stops_before_a_new_user_line():
    """The bundled folder's template lays chats out as plain lines: without the stop, a reply
    runs on into invented turns."""
    chat = load_chat_template(default_model_path())
    assert chat.source.endswith("tokenizer_config.json")
    assert chat.stop == BUILTIN_STOP
    assert chat.render(MESSAGES) == "User: Hello\nAssistant:"


def test_written_template_equals_the_plain_format(tmp_path):
    assert load_chat_template(folder_with(tmp_path, CHAT_TEMPLATE)).stop == BUILTIN_STOP
    assert load_chat_template(folder_with(tmp_path, None)).stop == BUILTIN_STOP


def test_other_templates_bring_no_stop_strings(tmp_path):
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = load_chat_template(folder_with(tmp_path, chatml))
    assert chat.stop == []
    assert chat.render(MESSAGES).endswith("<|im_start|>assistant\n")
