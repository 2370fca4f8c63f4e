"""Extraction cases for structured output: a short made-up document per domain and varied JSON
schemas over its fields (flat, optional fields and no extra properties, nested objects with enums,
arrays of objects with bounds, nullable fields and `$defs` references), 60 in all.

Strings are bounded (`maxLength`) where a small model might otherwise write on until `max_tokens`;
bounds stay small because each bounded repetition costs the grammar compiler time
(server/engines/grammar_check.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The questions each case is asked with (the schema says the rest).
INSTRUCTION = "Extract the facts from the text above as JSON."


def text(max_length: int = 16) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def number(low: float, high: float, exclusive: bool = False) -> dict[str, Any]:
    if exclusive:
        return {"type": "number", "exclusiveMinimum": low, "exclusiveMaximum": high}
    return {"type": "number", "minimum": low, "maximum": high}


def choice(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


@dataclass(frozen=True)
class Domain:
    name: str
    document: str
    fields: dict[str, dict[str, Any]]


DOMAINS = (
    Domain(
        "person",
        "Ada Lovelace was born in London in 1815. She was a mathematician and wrote notes on the "
        "Analytical Engine. Friends wrote to her at ada@example.org.",
        {
            "name": text(),
            "born": integer(1000, 2100),
            "city": text(12),
            "job": choice("mathematician", "poet", "other"),
        },
    ),
    Domain(
        "invoice",
        "Invoice 4471 from Northwind Ltd, dated 2024-03-15, lists 3 chairs at 45.50 each and one table "
        "at 120.00. The total is 256.50 EUR and it has been paid.",
        {
            "number": integer(0, 99999),
            "seller": text(),
            "total": number(0, 100000),
            "currency": choice("EUR", "USD", "GBP"),
            "paid": {"type": "boolean"},
        },
    ),
    Domain(
        "shipment",
        "Shipment SH-882 left Rotterdam on 2024-05-02 bound for Oslo with 12 crates weighing 840 kg. "
        "The carrier is Nordline and the priority is high.",
        {
            "origin": text(12),
            "destination": text(12),
            "crates": integer(0, 1000),
            "weight_kg": number(0, 50000),
            "priority": choice("low", "normal", "high"),
        },
    ),
    Domain(
        "weather",
        "Weather for Lyon: 18 degrees, humidity 65 percent, wind 12 km/h from the north, light rain expected.",
        {
            "city": text(12),
            "temperature": number(-60, 60),
            "humidity": integer(0, 100),
            "wind_from": choice("north", "south", "east", "west"),
            "rain": {"type": "boolean"},
        },
    ),
    Domain(
        "meeting",
        "The budget meeting is on Tuesday at 10:00 in room 4B with Alice, Bob and Chen. On the agenda: "
        "travel costs and hiring.",
        {"topic": text(), "day": choice("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"), "room": text(8)},
    ),
    Domain(
        "product",
        "The Trailblazer backpack costs 89.99 USD, weighs 1.2 kg, holds 30 litres, comes in red or grey "
        "and is rated 4.5 out of 5.",
        {
            "product": text(),
            "price": number(0, 10000),
            "litres": integer(0, 200),
            "rating": number(0, 5),
            "colour": choice("red", "grey", "blue"),
        },
    ),
    Domain(
        "book",
        "The novel Silent Harbour by Mara Quinn was published in 2019 by Lantern Press. It has 312 "
        "pages and is a mystery.",
        {
            "title": text(),
            "author": text(),
            "year": integer(1400, 2100),
            "pages": integer(1, 5000),
            "genre": choice("mystery", "romance", "history", "science"),
        },
    ),
    Domain(
        "recipe",
        "Pancakes: mix 2 eggs, 200 g of flour and 300 ml of milk, then fry each for 2 minutes a side. Serves 4.",
        {"dish": text(), "eggs": integer(0, 12), "flour_g": integer(0, 2000), "serves": integer(1, 20)},
    ),
    Domain(
        "incident",
        "At 14:32 the web server answered with error 503 for 7 minutes. Severity: major. It was resolved "
        "by restarting the cache.",
        {
            "status_code": integer(100, 599),
            "minutes": integer(0, 1440),
            "severity": choice("minor", "major", "critical"),
            "fix": text(),
        },
    ),
    Domain(
        "flight",
        "Flight AF 1234 from Paris to Rome leaves at 08:15 from gate K42 and lands at 10:20. It is "
        "delayed by 25 minutes.",
        {
            "flight": text(8),
            "from": text(12),
            "to": text(12),
            "delay_minutes": integer(0, 600),
            "status": choice("on time", "delayed", "cancelled"),
        },
    ),
    Domain(
        "student",
        "Student Tom Berg, number 20931, scored 82 in physics, 91 in maths and 77 in history.",
        {
            "student": text(),
            "id": integer(0, 99999),
            "physics": integer(0, 100),
            "maths": integer(0, 100),
            "history": integer(0, 100),
        },
    ),
    Domain(
        "lease",
        "The lease between Harbor LLC and J. Diaz runs for 24 months from 2025-01-01. The rent is 1450 "
        "a month and the deposit 2900.",
        {"landlord": text(), "tenant": text(), "months": integer(1, 120), "rent": number(0, 100000, exclusive=True)},
    ),
)


@dataclass(frozen=True)
class SchemaCase:
    """One schema over one domain's document; `name` is domain/variant."""

    name: str
    schema: dict[str, Any]
    document: str

    def prompt(self) -> str:
        """The document and the instruction, as one chat turn's text."""
        return f"{self.document}\n\n{INSTRUCTION}"


def _obj(properties: dict[str, Any], required: list[str] | None = None, closed: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    schema["required"] = list(properties) if required is None else required
    if closed:
        schema["additionalProperties"] = False
    return schema


def variants(domain: Domain) -> dict[str, dict[str, Any]]:
    """Five schemas over a domain's fields."""
    fields = domain.fields
    names = list(fields)
    first, second = names[0], names[1]
    return {
        # Every field, required.
        "flat": _obj(fields),
        # Half of them optional, nothing else allowed.
        "optional": _obj(fields, required=names[: len(names) // 2], closed=True),
        # The record nested under a key, beside an enum and a bounded number.
        "nested": _obj(
            {
                "record": _obj(fields),
                "confidence": choice("low", "medium", "high"),
                "score": number(0, 1),
            }
        ),
        # A bounded array of small objects, and a count.
        "array": _obj(
            {
                "facts": {
                    "type": "array",
                    "items": _obj({"field": choice(*names), "value": text(12)}),
                    "minItems": 1,
                    "maxItems": 3,
                },
                "count": integer(0, 10),
            }
        ),
        # A nullable field, a constant and a `$defs` reference.
        "defs": {
            "$defs": {"main": _obj({first: fields[first], second: fields[second]})},
            "type": "object",
            "properties": {
                "kind": {"const": domain.name},
                "main": {"$ref": "#/$defs/main"},
                "note": {"anyOf": [text(12), {"type": "null"}]},
            },
            "required": ["kind", "main", "note"],
        },
    }


CASES: tuple[SchemaCase, ...] = tuple(
    SchemaCase(f"{domain.name}/{variant}", schema, domain.document)
    for domain in DOMAINS
    for variant, schema in variants(domain).items()
)
