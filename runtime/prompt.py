"""Prompt text before tokenizing, torch-free: the one cleaning every text encoder applies (the torch
one in export/text_encoder.py and the exported graphs' tokenizer in runtime/backends)."""
from __future__ import annotations

import html
import re


def clean_prompt(text: str) -> str:
    """The official prompt cleaning (HuggingfaceTokenizer clean="whitespace"; diffusers prompt_clean).

    ftfy.fix_text, html.unescape twice, strip, then every whitespace run -> one space, strip.
    The official code collapses whitespace with the `regex` module and diffusers with stdlib `re`;
    their `\\s` differ only on U+001C..U+001F, which ftfy.fix_text (and html.unescape for
    character references) removes first, so both give the same string.
    """
    import ftfy  # an extra of both the export and the serving installs, imported when first used

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()
