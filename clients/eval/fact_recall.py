"""fact_recall: facts stated once in a novel, asked for after it (BABILong's facts in natural
narrative; RULER's needles, but not in a repeated haystack).

Each fact is one invented sentence about an invented person and a random four-digit number
("Mr. Threlkeld kept his papers in locker number 4817 at the bank."), placed at a sentence
boundary at a spread depth of a passage of an Austen novel. Nothing in the fact can be known from
memory: the names are not Austen's and the number is drawn at random. Every fact of a document
has its own template (a different attribute), so no two facts answer the same cue. The probe is
asked after the document, in one of three styles (each its own task):

* `fact_recall` restates the fact's beginning and lets the model finish it ("Mr. Threlkeld kept
  papers in locker number");
* `fact_recall_paraphrased` restates it in other words ("Mr. Threlkeld's locker at the bank was
  number"): the model must find the fact by its meaning, not by its words;
* `fact_recall_question` asks a question with a one-line instruction (chat style, plain text).

A trial scores 1 when the first number the model writes is the fact's. The depth and the distance
in tokens from the fact to the end of the document are recorded per trial, so a cell also gives a
score by distance ("lost in the middle").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import partial

from clients.eval.documents import Case, CountTokens, Document, Probed, boundary_at, cell_rng, draw, spread

TASK = "fact_recall"
# The task of each probe style.
STYLES = {"fact_recall": "restated", "fact_recall_paraphrased": "paraphrased", "fact_recall_question": "question"}
MAX_NEW_TOKENS = 12

# (fact, question, cue): {who} is the person, {n} the number. The cue ends where the number is due.
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("{who} kept papers in locker number {n} at the bank.", "What was the number of {who}'s locker at the bank?",
     "{who}'s locker at the bank was number"),
    ("At the Crown inn {who} always took room {n}.", "Which room did {who} take at the Crown inn?",
     "At the Crown inn, {who}'s room was number"),
    ("{who} paid {n} guineas for the grey mare.", "How many guineas did {who} pay for the grey mare?",
     "For the grey mare, {who} had paid this many guineas:"),
    ("The library of {who} held {n} volumes.", "How many volumes did {who}'s library hold?",
     "The number of volumes in {who}'s library was"),
    ("The cellar of {who} held {n} bottles of claret.", "How many bottles of claret were in {who}'s cellar?",
     "The number of bottles of claret in {who}'s cellar was"),
    ("{who} had planted {n} apple trees in the orchard.", "How many apple trees had {who} planted?",
     "The number of apple trees {who} had planted was"),
    ("{who} owed the draper {n} shillings.", "How many shillings did {who} owe the draper?",
     "The draper was owed, by {who}, this many shillings:"),
    ("The flock of {who} numbered {n} sheep.", "How many sheep were in {who}'s flock?",
     "The number of sheep in {who}'s flock was"),
    ("The pew of {who} in the chapel was marked {n}.", "What number marked {who}'s pew in the chapel?",
     "In the chapel, {who}'s pew was marked with the number"),
    ("The carriage of {who} bore the number {n} on its door.", "What number was on the door of {who}'s carriage?",
     "The number on the door of {who}'s carriage was"),
    ("{who} counted {n} stairs up to the old tower.", "How many stairs did {who} count up to the tower?",
     "The stairs up to the old tower, as {who} counted them, numbered"),
    ("The watch of {who} was engraved with the number {n}.", "What number was engraved on {who}'s watch?",
     "The number engraved on {who}'s watch was"),
    ("The trunk sent to {who} was labelled {n}.", "What label did the trunk sent to {who} carry?",
     "The trunk sent to {who} carried the label"),
    ("{who} kept {n} bees behind the vicarage.", "How many bees did {who} keep behind the vicarage?",
     "Behind the vicarage, the bees of {who} numbered"),
    ("The house of {who} in London was number {n}, Harley Street.", "What number in Harley Street was {who}'s house?",
     "In Harley Street, {who}'s house was number"),
    ("{who} once won {n} pounds at cards.", "How many pounds did {who} win at cards?",
     "At cards, {who} had once won this many pounds:"),
    ("The ticket for the passage of {who} was number {n}.", "What was the number of {who}'s passage ticket?",
     "{who}'s ticket for the passage was number"),
    ("The dowry of {who} was {n} pounds.", "How many pounds was {who}'s dowry?",
     "In pounds, {who}'s dowry came to"),
    ("{who} had walked {n} miles that winter.", "How many miles had {who} walked that winter?",
     "That winter, the miles {who} had walked came to"),
    ("The parish register listed {who} as entry {n}.", "As which entry did the parish register list {who}?",
     "In the parish register, {who} was entry number"),
    ("The annual rent of the farm of {who} was {n} shillings.", "What was the annual rent of {who}'s farm?",
     "In shillings, the annual rent of {who}'s farm was"),
    ("The regiment of {who} sailed on ship number {n}.", "On which ship number did {who}'s regiment sail?",
     "{who}'s regiment sailed on ship number"),
    ("{who} wrote {n} letters in one year.", "How many letters did {who} write in one year?",
     "In one year, the letters {who} wrote numbered"),
    ("The coat of {who} had cost {n} pence.", "How many pence had {who}'s coat cost?",
     "In pence, {who}'s coat had cost"),
)  # fmt: skip

# Surnames in no Austen novel, so the person is new to the model and to the text.
SURNAMES = (
    "Threlkeld", "Pargeter", "Stainforth", "Wardlow", "Kettering", "Ashcombe", "Pembrook", "Tullamore",
    "Merriott", "Farrowby", "Quenell", "Haverleigh", "Brackwood", "Sollace", "Dunmarrow", "Ellerby",
    "Corvane", "Whitlock", "Marchbank", "Osterley", "Penhallow", "Rookesby", "Gillender", "Vantress",
    "Cheverell", "Amberton", "Lowick", "Fennimore", "Stroud", "Hollingdrake",
)  # fmt: skip
TITLES = ("Mr.", "Mrs.", "Miss", "Dr.", "Captain", "Lady", "Sir Henry", "Colonel")


@dataclass
class Fact:
    sentence: str
    question: str
    cue: str
    answer: str
    depth: float
    restated: str = ""  # the sentence up to the number


def facts(rng: random.Random, count: int) -> list[Fact]:
    """`count` facts, each its own template, person and number (numbers differ in every digit's
    position, so a wrong fact's number never passes for the right one)."""
    if count > len(TEMPLATES):
        raise ValueError(f"at most {len(TEMPLATES)} facts per document (one per template)")
    templates = rng.sample(TEMPLATES, count)
    people = [f"{rng.choice(TITLES)} {name}" for name in rng.sample(SURNAMES, count)]
    numbers = rng.sample(range(1000, 10000), count)
    out = []
    for (sentence, question, cue), who, number, depth in zip(templates, people, numbers, spread(count), strict=True):
        values = {"who": who, "n": str(number)}
        out.append(
            Fact(
                sentence.format(**values),
                question.format(**values),
                cue.format(**values),
                str(number),
                depth,
                sentence.split("{n}")[0].format(**values).rstrip(),
            )
        )
    return out


def cases(tokens: int, count: CountTokens, how_many: int, seed: int, index: int, style: str = "restated") -> Probed:
    """Document `index` of a cell: a passage of about `tokens` tokens with `how_many` facts, and
    their probes."""
    doc, placed = document(tokens, count, how_many, seed, index, style)
    return Probed(
        doc.text,
        doc.source,
        [Case(probe_text(f, style), f.answer, f.depth, at, partial(score, fact=f)) for f, at in placed],
    )


def document(
    tokens: int, count: CountTokens, count_facts: int, seed: int, index: int, style: str = "restated"
) -> tuple[Document, list[tuple[Fact, int]]]:
    """A passage with `count_facts` facts inserted at spread depths, and each fact with its
    position in tokens from the start of the text. Each style draws its own documents: a cell of
    one never finds another's document in the prefix cache."""
    rng = cell_rng(TASK, style, tokens, seed, index)
    chosen = facts(rng, count_facts)
    budget = tokens - sum(count(f.sentence) + 1 for f in chosen)
    doc = draw(budget, count, rng)
    places: list[int] = []
    for fact in chosen:
        places.append(boundary_at(doc, fact.depth, count, set(places)))
    for fact, place in sorted(zip(chosen, places, strict=True), key=lambda fp: -fp[1]):
        doc.insert(place, fact.sentence)  # from the end, so earlier indices stay valid
    return doc, [(fact, _position(doc, fact.sentence, count)) for fact in chosen]


def _position(doc: Document, sentence: str, count: CountTokens) -> int:
    return count(doc.prefix(doc.sentences.index(sentence)))


def probe_text(fact: Fact, style: str) -> str:
    if style == "question":
        return f"Answer from the text above with a number.\nQuestion: {fact.question}\nAnswer:"
    if style == "paraphrased":
        return fact.cue
    return fact.restated


def score(generated: str, fact: Fact) -> float:
    """1.0 when the first number the model writes is the fact's.

    >>> fact = Fact("", "", "", "4817", 0.5)
    >>> score(" 4817 at the bank.", fact), score(" 4,817", fact), score(" 9 or 4817", fact)
    (1.0, 1.0, 0.0)
    """
    first = re.search(r"\d[\d,]*", generated)
    return float(first is not None and first.group(0).replace(",", "") == fact.answer)
