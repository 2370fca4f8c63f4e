"""The passkey benchmark's pieces that need no server."""

from __future__ import annotations

from clients.bench_passkey import (
    Cell,
    Trial,
    load_token_counter,
    make_case,
    parse_length,
    render_table,
    spec_for_length,
    split_strategies,
)


def test_parsing() -> None:
    assert parse_length("12k") == 12000 and parse_length("16384") == 16384
    assert split_strategies("native,yarn:factor=4,beta_fast=16,ntk") == [
        {"name": "native"},
        {"name": "yarn", "factor": 4, "beta_fast": 16},
        {"name": "ntk"},
    ]
    assert split_strategies("native;ntk:factor=2") == [{"name": "native"}, {"name": "ntk", "factor": 2}]
    assert split_strategies('[{"name": "nbce", "chunk_tokens": 4096}, "auto"]') == [
        {"name": "nbce", "chunk_tokens": 4096},
        {"name": "auto"},
    ]


def test_smallest_factor_per_length() -> None:
    assert spec_for_length({"name": "yarn"}, 12000, 8192)["factor"] == 2.0
    assert spec_for_length({"name": "yarn"}, 24000, 8192)["factor"] == 4.0
    assert spec_for_length({"name": "yarn", "factor": 8}, 12000, 8192)["factor"] == 8
    assert spec_for_length({"name": "nbce"}, 24000, 8192) == {"name": "nbce"}


def test_case_length_and_table() -> None:
    count = load_token_counter(None)
    case = make_case(6000, 0.5, "12345", count)
    total = count(case.context + "\n\n" + case.inputs)
    assert 5800 <= total <= 6000 and "12345" in case.context
    cells = {
        (0, 6000): Cell(
            [
                Trial(True, 2.0, 200, strategy={"name": "ntk", "factor": 2.0}),
                Trial(False, 4.0, 200, strategy={"name": "ntk", "factor": 2.0}),
            ]
        )
    }
    table = render_table(cells, [{"name": "ntk"}], [6000], 2)
    assert "| 6,000 | 1/2 ×2 (3.0 s) |" in table


def test_instruction_can_go_with_the_question() -> None:
    count = load_token_counter(None)
    classic = make_case(3000, 0.5, "12345", count)
    asked = make_case(3000, 0.5, "12345", count, instruction_in_inputs=True)
    assert (
        classic.context.startswith("There is an important info")
        and classic.inputs == "What is the pass key? The pass key is"
    )
    assert asked.inputs.startswith("There is an important info") and asked.inputs.endswith("The pass key is")
    assert "important info" not in asked.context and "12345" in asked.context
    assert 2800 <= count(asked.context + "\n\n" + asked.inputs) <= 3000


def test_varied_haystack_has_no_repeated_chunks() -> None:
    count = load_token_counter(None)
    case = make_case(6000, 0.3, "54321", count, varied=True)
    assert 5700 <= count(case.context + "\n\n" + case.inputs) <= 6000 and "54321" in case.context
    quarters = [case.context[i * len(case.context) // 4 : (i + 1) * len(case.context) // 4] for i in range(4)]
    assert len(set(quarters)) == 4 and make_case(6000, 0.3, "54321", count, varied=True) == case
