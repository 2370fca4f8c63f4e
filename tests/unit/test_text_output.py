"""The text a client reads of a stream of token ids (server/service/text_output.py), checked
against what vLLM and TGI give for the same tokens: the real model's tokenizer, stop strings cut
wherever they fall, the text before them returned, nothing of a stop string ever sent."""

from __future__ import annotations

import doctest
from functools import cache
from typing import Any

from server.engines.base import EngineStep, SamplingOptions
from server.ops.model_store import default_checkpoint_dir
from server.service import text_output
from server.service.text_output import OutputText, find_stop

TEXT = "The capital of France is Paris."


@cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


def ids(text: str = TEXT) -> list[int]:
    return list(tokenizer().encode(text, add_special_tokens=False))


def output(tokens: list[int], max_new_tokens: int = 64, **sampling: Any) -> list[EngineStep]:
    """The steps of `tokens` added one by one, up to the one that finishes the output."""
    out = OutputText(tokenizer(), (), SamplingOptions(max_new_tokens=max_new_tokens, **sampling), prompt_tokens=5)
    steps = []
    for token in tokens:
        steps.append(out.add(token))
        if steps[-1].finished:
            break
    return steps


def text(steps: list[EngineStep]) -> str:
    return "".join(s.text for s in steps)


def test_the_docstring_examples_run() -> None:
    assert doctest.testmod(text_output).failed == 0


def test_without_a_stop_the_text_is_the_tokens_decoded() -> None:
    steps = output(ids(), max_new_tokens=len(ids()))
    assert text(steps) == TEXT and steps[-1].finish_reason == "length"
    assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]
    assert all(s.prompt_tokens == 5 and len(s.tokens) == 1 for s in steps)


def test_a_stop_string_spanning_tokens_ends_the_output_with_the_text_before_it() -> None:
    tokens = ids()
    france = next(k for k in range(len(tokens)) if "France" in tokenizer().decode(tokens[: k + 1]))
    assert "of" not in tokenizer().decode(tokens[france : france + 1])  # "of Fr" spans two tokens
    steps = output(tokens, stop=("of Fr",))
    assert text(steps) == "The capital " and steps[-1].finish_reason == "stop_sequence"
    assert len(steps) == france + 1  # finished at the token that completes the stop string


def test_a_stop_string_beginning_inside_a_token_keeps_that_tokens_text_before_it() -> None:
    steps = output(ids("Hello, world"), stop=("lo,",))
    assert text(steps) == "Hel" and steps[-1].finish_reason == "stop_sequence"


def test_a_stop_string_at_the_start_leaves_no_text() -> None:
    steps = output(ids(), stop=("The",))
    assert text(steps) == "" and len(steps) == 1 and steps[0].finish_reason == "stop_sequence"


def test_of_several_stop_strings_the_first_in_the_text_ends_it() -> None:
    steps = output(ids(), stop=("Paris", "capital"))
    assert text(steps) == "The " and steps[-1].finish_reason == "stop_sequence"
    steps = output(ids(), stop=("nowhere", "is"))
    assert text(steps) == "The capital of France " and steps[-1].finish_reason == "stop_sequence"


def test_text_that_may_begin_a_stop_string_is_held_back_and_then_sent() -> None:
    tokens = ids()
    steps = output(tokens, max_new_tokens=len(tokens), stop=("Paris!",))
    sent = [text(steps[: k + 1]) for k in range(len(steps))]
    # While "Paris" may still become "Paris!", it is not sent; once "." rules it out, it is.
    assert not any(s.endswith("Paris") for s in sent)
    assert text(steps) == TEXT and steps[-1].finish_reason == "length"


def test_a_character_split_across_tokens_is_sent_whole() -> None:
    word = "café 🙂 naïve"
    tokens = ids(word)
    assert len(tokens) > len(word.split())  # the emoji is several byte tokens
    steps = output(tokens, max_new_tokens=len(tokens))
    assert all("\ufffd" not in s.text for s in steps) and text(steps) == word


def test_eos_ends_the_output_without_text_unless_ignored() -> None:
    eos = tokenizer().eos_token_id
    tokens = [*ids("Yes"), eos, *ids(" no")]
    steps = output(tokens)
    assert text(steps) == "Yes" and steps[-1].finish_reason == "eos_token" and steps[-1].tokens[0].special
    steps = output(tokens, max_new_tokens=len(tokens), ignore_eos=True)
    assert text(steps) == "Yes no" and steps[-1].finish_reason == "length"


def test_find_stop_looks_only_where_a_stop_can_end_in_the_new_text() -> None:
    assert find_stop("ab cd ab", ("ab",), new_from=7) == 6  # the earlier "ab" was seen before
    assert find_stop("ab cd", ("ab",), new_from=4) is None
    assert find_stop("xx stop", ("op", "st"), new_from=5) == 3
