"""The one place that turns a user message into prompt token ids (chat template when the tokenizer has one)."""

from __future__ import annotations

from cllm.errors import CllmError


def format_prompt(tokenizer, text: str, system: str | None = None) -> list[int]:
    """Token ids of `text` as a single user turn, ready for the assistant's answer.

    With a chat template: the template with `add_generation_prompt=True` (its default system prompt applies when
    `system` is None). Without one: the plain text, with the tokenizer's special tokens (e.g. BOS).
    """
    if not isinstance(text, str) or not text.strip():
        raise CllmError("empty prompt")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text if system is None else f"{system}\n\n{text}")["input_ids"])


def format_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ({role, content} dicts), ready for the assistant's next answer: the chat template
    when the tokenizer has one; without one, the contents joined by newlines. A single user message gives exactly
    `format_prompt`'s ids."""
    if not messages or any(not isinstance(m.get("content"), str) for m in messages):
        raise CllmError("a conversation needs at least one message, each with text content")
    if len(messages) == 1 and messages[0].get("role") == "user":
        return format_prompt(tokenizer, messages[0]["content"])
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def check_fits_context(model, prompts: dict, max_new_tokens: int) -> None:
    """Refuse, before decoding, a prompt that leaves no room for `max_new_tokens` in the model's context
    (`max_position_embeddings`): positions past it are undefined for most models. `prompts` maps a prompt's id
    (named in the error) to its token ids."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context:
        return
    for pid, ids in prompts.items():
        if len(ids) + max_new_tokens > context:
            raise CllmError(f"prompt {pid}: {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceed the model's "
                            f"context of {context} tokens (shorten the prompt or lower --max-new-tokens)")
