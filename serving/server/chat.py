"""Chat templates: a conversation as the text a language model continues.

A chat model reads a conversation as one prompt laid out by its chat template, a Jinja template
in the form Hugging Face's `tokenizer_config.json` and keras-hub's presets store it: it sees
`messages` (each a dict with `role` and `content`), `add_generation_prompt`, `bos_token` and
`eos_token`, and may call `raise_exception(message)`. The template comes with the strings that
end the assistant's turn (`stop`), which the server matches on the generated text.

An export carries its template in `assets.extra/lmstack_config.json` (`lmstack export
--chat_template=FILE`); one without it is served with `DEFAULT`, which lays a conversation out
as plain lines a model trained on any text can continue:

    System: You are terse.
    User: Who is Romeo?
    Assistant:

and stops where the model starts the user's next line ("\\nUser:").

Templates run in Jinja's sandbox (as Hugging Face runs them): they can read their variables and
call `raise_exception`, nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message.role | capitalize }}: {{ message.content | trim }}\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt %}Assistant:{% endif -%}")
DEFAULT_STOP = ("\nUser:", "\nSystem:")


class TemplateError(ValueError):
    """A template that does not compile, or that refused a conversation (raise_exception)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template and the strings that end its turn.

    Attributes:
        template: Jinja source.
        stop: strings that end the assistant's turn (matched on the generated text).
        bos_token, eos_token: what the template may put around turns, as text.
    """
    template: str = DEFAULT_TEMPLATE
    stop: tuple[str, ...] = DEFAULT_STOP
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_export(cls, info: dict[str, Any]) -> ChatTemplate:
        """The template an export's lmstack_config.json carries (its "chat_template"), or DEFAULT."""
        entry = info.get("chat_template")
        if not entry:
            return cls()
        return cls(template=entry["template"], stop=tuple(entry.get("stop") or ()),
                   bos_token=entry.get("bos_token") or "", eos_token=entry.get("eos_token") or "")

    @classmethod
    def parse(cls, text: str, as_json: bool) -> ChatTemplate:
        """A template file's text: Jinja, or (`as_json`) an object with "chat_template" and optionally
        "stop", "bos_token" and "eos_token" as Hugging Face's tokenizer_config.json holds them (a token
        a string or an added-token object with "content"). Raises TemplateError."""
        if not as_json:
            return cls(template=text, stop=())
        try:
            entry = json.loads(text)
            template = cls(template=entry["chat_template"], stop=tuple(entry.get("stop") or ()),
                           bos_token=_token_text(entry.get("bos_token")), eos_token=_token_text(entry.get("eos_token")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TemplateError("a JSON file holds {\"chat_template\": \"...\", \"stop\": [...]} (as "
                                f"tokenizer_config.json does): {type(e).__name__}: {e}") from None
        if not isinstance(template.template, str) or not all(isinstance(s, str) and s for s in template.stop):
            raise TemplateError("\"chat_template\" is a string and \"stop\" a list of non-empty strings")
        return template

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "stop": list(self.stop), "bos_token": self.bos_token,
                "eos_token": self.eos_token}

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages`, ending where the assistant's reply begins.

        Raises:
            TemplateError: the template refused the conversation, or failed on it.
        """
        import jinja2

        try:
            return _compiled(self.template).render(messages=messages, add_generation_prompt=True,
                                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template failed on this conversation: {e}") from None


def check(template: ChatTemplate) -> None:
    """Raises TemplateError unless the template compiles and lays out a small conversation as text."""
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."}])
    if "Hello." not in text:
        raise TemplateError("the chat template leaves the user's message out of the prompt it makes")


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content", "") if isinstance(token, dict) else (token or "")


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(f"the model's chat template refused this conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None
