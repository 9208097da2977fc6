"""Prompt templates: built-ins render, prefixes are shared, user files are validated, no leakage."""

from __future__ import annotations

import re

import pytest

from refine_llm import prompts
from refine_llm.errors import UserError
from refine_llm.questions import load_wordlists

CTX, Q = "Mary got off the flight to visit John.", "Who was a nurse?"


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("name", ["paper", "qa"])
def test_text_builtins_render_and_share_prefix(name):
    p = prompts.load_prompt(name)
    s = p.render(CTX, Q)
    assert CTX in s and Q in s and "[" not in s.split("\n")[-1]
    assert s.startswith(p.prefix()) and len(p.prefix()) > 100
    assert p.fingerprint == prompts.load_prompt(name).fingerprint


def test_paper_prompt_shape():
    s = prompts.load_prompt("paper").render(CTX, Q)
    assert s.startswith("TASK") and s.endswith(f"QUESTION : {CTX} {Q}\nblank =")
    assert s.count("blank =") == 5  # four solved examples + the question


def test_fingerprints_differ():
    assert len({prompts.load_prompt(n).fingerprint for n in prompts.BUILTIN_PROMPTS}) == 3


def test_chat_uses_template_and_opens_assistant_turn(smol_tok):
    p = prompts.load_prompt("chat")
    s = p.render(CTX, Q, smol_tok)
    assert s.endswith("<|im_start|>assistant\n") and CTX in s
    assert s.startswith(p.prefix(smol_tok)) and "Dmitri" in p.prefix(smol_tok)
    assert not p.add_special_tokens


def test_chat_without_chat_template_is_user_error(smol_tok):
    import copy

    tok = copy.copy(smol_tok)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        prompts.load_prompt("chat").render(CTX, Q, tok)


def test_placeholders_substituted_once():
    p = prompts.load_prompt("qa")
    s = p.render("A [question] B.", "Who?")
    assert "A [question] B." in s


@pytest.mark.parametrize("text,match", [
    ("Text: [context] Answer:", r"missing placeholder \[question\]"),
    ("Text: [Context] [Question] Answer:", "spelled differently"),
    ("nothing here", r"\[context\] and \[question\]"),
])
def test_user_file_missing_placeholder_names_the_file(tmp_path, text, match):
    f = tmp_path / "mine.txt"
    f.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        prompts.load_prompt(str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_user_file_ok_and_missing_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Q: [context] [question]\nA:\n")
    p = prompts.load_prompt(str(f))
    assert p.render("c", "q?") == "Q: c q?\nA:" and p.prefix() == "Q: "
    with pytest.raises(UserError, match="no such built-in prompt or file"):
        prompts.load_prompt(str(tmp_path / "nope.txt"))


def test_chat_file_must_end_with_user(tmp_path):
    f = tmp_path / "chat.txt"
    f.write_text("### user\n[context] [question]\n### assistant\nBob\n")
    with pytest.raises(UserError, match=r"end with a '### user'"):
        prompts.load_prompt(str(f))


def _examples(name: str) -> list[tuple[str, str]]:
    """(text of the example, its answer) for each solved example of a built-in."""
    text = prompts.load_prompt(name).text
    if name == "paper":
        return re.findall(r"QUESTION : (.+)\nblank = (\S+)", text)
    if name == "qa":
        return [(t, a) for t, a in re.findall(r"Text: (.+?) Answer: (\S+)", text)]
    return [(u, a) for u, a in re.findall(r"### user\n(.+?)\n### assistant\n(\S+)", text, re.S)]


@pytest.mark.parametrize("name", ["paper", "qa", "chat"])
def test_examples_do_not_leak_word_lists(name):
    vocab, attrs = set(), set()
    for cat in ("gender", "nationality", "ethnicity", "religion"):
        wl = load_wordlists(cat)
        vocab |= {v.lower() for s in wl.subjects for v in wl.forms[s].values()}
        attrs |= {a.text.lower() for a in wl.attributes} | {a.negated_text.lower() for a in wl.attributes}
    exs = _examples(name)
    assert len(exs) == (2 if name == "chat" else 4)
    for text, answer in exs:
        words = set(re.findall(r"[A-Za-z-]+", text.lower()))
        assert answer.lower() not in vocab and not (words & {v for v in vocab if len(v) > 3}), (name, text)
        assert not any(a in text.lower() for a in attrs), (name, text)


@pytest.mark.parametrize("name", ["paper", "qa", "chat"])
def test_examples_balance_answer_positions(name):
    first = 0
    for text, answer in _examples(name):
        ctx = text.split("Who")[0]
        others = [w for w in re.findall(r"[A-Z][a-z]+|tall|short|red-haired|blond", ctx) if w not in ("The", "Text", "Question")]
        first += others.index(answer) == 0 if answer in others else 0
    assert first == len(_examples(name)) // 2
