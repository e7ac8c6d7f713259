"""Chat templates for checkpoints that ship without one.

The Gemma GGUF files (the bundled gemma3-270m among them) carry no
`tokenizer.chat_template`; llama.cpp falls back to a built-in Gemma template, and so
does jft. This is Gemma's documented turn format: a system message is prepended to
the first user turn, and the assistant's role is called `model`.
"""

from __future__ import annotations

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

BY_FAMILY = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA}
