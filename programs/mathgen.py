"""Seeded multi-step arithmetic word problems in the GSM-Symbolic manner: templates × numbers, gold by code.

Each :class:`Template` is a word problem with named numeric slots, the ranges its numbers are drawn from,
and a ``solve`` function that computes, from the same numbers, the chain of intermediate quantities a
solution goes through; the last one is the gold answer and the chain's length is the problem's ``steps``
(2..6), its difficulty. A draw is kept only if every intermediate is positive and clean (a whole number,
or a decimal of at most two places where the template allows money), and the template's own condition
holds, so the gold never needs rounding.

``generate(n, seed, split)`` is deterministic per ``(seed, split)``: it walks the step levels 2, 3, 4, 5,
6, 2, ... (so any prefix is spread over difficulty) and, within a level, the level's templates in turn.
The two splits never share a problem: a problem (template and numbers; people's names do not count)
belongs to ``dev`` or ``test`` by a hash of it, whatever the seed. The experiment configs use ``test``;
``dev`` is for anything that is tuned (prompts, β, the trust region), so that nothing is tuned on
the problems results are reported on.

>>> from programs.mathgen import generate
>>> problems = generate(5, seed=0, split="test")
>>> [p.steps for p in problems]
[2, 3, 4, 5, 6]
>>> problems[0].answer == generate(1, seed=0, split="test")[0].answer
True
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import dspy

SPLITS = ("dev", "test")
STEP_LEVELS = (2, 3, 4, 5, 6)
DEFAULT_SIZE = 96
NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Leo",
         "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf")


@dataclass(frozen=True)
class Template:
    """A word problem with numeric slots ``{x}`` and word slots (``{name}``, ``{name2}``, ``{name3}`` are
    people; other word slots draw from ``words``). ``solve`` maps the numbers to the intermediate
    quantities, the gold last; ``whole`` asks every intermediate to be a whole number (counts of things),
    else two decimal places are allowed (money, kilometres); ``check`` is any further condition."""

    id: str
    text: str
    hint: str
    numbers: dict[str, Sequence[int]]
    solve: Callable[[dict[str, Fraction]], list[Fraction]]
    words: dict[str, Sequence[str]] = field(default_factory=dict)
    whole: bool = False
    check: Callable[[dict[str, Fraction], list[Fraction]], bool] = lambda v, s: True

    @property
    def steps(self) -> int:
        """The number of intermediate quantities a solution computes (the same for every draw)."""
        return len(self.solve({k: Fraction(v[0]) for k, v in self.numbers.items()}))

    def values(self, numbers: dict[str, int]) -> list[Fraction] | None:
        """The intermediates for these numbers, or None if the draw breaks a constraint."""
        v = {k: Fraction(x) for k, x in numbers.items()}
        try:
            chain = self.solve(v)
        except ZeroDivisionError:
            return None
        clean = all(q > 0 and (q.denominator == 1 if self.whole else 100 % q.denominator == 0) for q in chain)
        return chain if clean and self.check(v, chain) else None


def _pct(x: Fraction, p: Fraction) -> Fraction:
    return x * p / 100


TEMPLATES: tuple[Template, ...] = (
    # --- 2 steps
    Template("change", "{name} buys {n} {items} at ${p} each and pays with a ${bill} bill. How much change, in "
             "dollars, does {name} get?", "Find the total cost first, then take it from the bill.",
             {"n": range(2, 13), "p": range(1, 16), "bill": (20, 50, 100)},
             lambda v: [c := v["n"] * v["p"], v["bill"] - c],
             {"items": ("notebooks", "pens", "mugs", "apples", "stickers", "candles")}),
    Template("drive", "A {vehicle} travels at {v} km per hour for {h} hours, then {d} km more. How many kilometres "
             "does it travel in all?", "Distance is speed times time; then add the extra part.",
             {"v": range(30, 111, 5), "h": range(2, 9), "d": range(5, 96, 5)},
             lambda v: [a := v["v"] * v["h"], a + v["d"]], {"vehicle": ("bus", "truck", "train", "van")}),
    Template("share", "{name} has {a} {things} and buys {b} more, then shares all of them equally among {k} "
             "friends. How many {things} does each friend get?", "Find how many there are in all, then divide.",
             {"a": range(10, 81), "b": range(5, 61), "k": range(2, 10)},
             lambda v: [t := v["a"] + v["b"], t / v["k"]], {"things": ("marbles", "cards", "stickers", "cookies")},
             whole=True),
    # --- 3 steps
    Template("ages", "{name} is {a} years old. {name2} is {b} years older than {name}, and {name3} is {m} times "
             "as old as {name2}. How old will {name3} be in {c} years?",
             "Work out each person's age now, in the order they are mentioned, then add the years.",
             {"a": range(3, 16), "b": range(2, 11), "m": (2, 3), "c": range(2, 11)},
             lambda v: [x := v["a"] + v["b"], y := v["m"] * x, y + v["c"]], whole=True),
    Template("discount", "A {item} costs ${price}. This week it is {pct}% off. How much do {n} of them cost this "
             "week, in dollars?", "Find the discount on one, the sale price of one, then the price of all.",
             {"price": range(10, 121), "pct": (10, 15, 20, 25, 30, 40, 50), "n": range(2, 7)},
             lambda v: [d := _pct(v["price"], v["pct"]), s := v["price"] - d, s * v["n"]],
             {"item": ("jacket", "lamp", "backpack", "board game", "kettle")}),
    Template("laps", "{name} runs {laps} laps of a {m}-metre track every day for {days} days. How many kilometres "
             "does {name} run in all?", "Metres per day, then metres in all; 1 km is 1000 m.",
             {"laps": range(2, 13), "m": (200, 250, 400, 500), "days": range(3, 15)},
             lambda v: [a := v["laps"] * v["m"], b := a * v["days"], b / 1000]),
    # --- 4 steps
    Template("wage", "{name} earns ${w} an hour and works {h} hours a day, {d} days a week. Each week {name} spends "
             "${s} on rent and food. How much does {name} save in {wk} weeks?",
             "Pay per day, pay per week, what is left each week, then over all the weeks.",
             {"w": range(10, 31), "h": range(4, 10), "d": range(3, 7), "s": range(100, 601, 25),
              "wk": range(2, 9)},
             lambda v: [a := v["w"] * v["h"], b := a * v["d"], c := b - v["s"], c * v["wk"]], whole=True),
    Template("bakery", "A bakery bakes {trays} trays of {per} muffins. It sells {pct}% of the muffins at ${price} "
             "each. Baking all of them cost ${cost}. What is the bakery's profit, in dollars?",
             "Count the muffins, the muffins sold, the money taken, then take away the cost.",
             {"trays": range(3, 13), "per": (6, 8, 10, 12, 24), "pct": (25, 50, 75, 80, 90),
              "price": range(2, 6), "cost": range(10, 101, 5)},
             lambda v: [t := v["trays"] * v["per"], s := _pct(t, v["pct"]), r := s * v["price"], r - v["cost"]],
             whole=True),
    Template("fuel", "A car uses {l} litres of fuel per 100 km. {name} drives {d1} km on Monday and {d2} km on "
             "Tuesday. Fuel costs ${c} a litre. How much does the fuel for the two days cost, in dollars?",
             "Total distance, then hundreds of km, then litres, then dollars.",
             {"l": range(5, 13), "d1": range(50, 401, 25), "d2": range(50, 401, 25), "c": (1, 2, 3)},
             lambda v: [d := v["d1"] + v["d2"], h := d / 100, f := h * v["l"], f * v["c"]]),
    # --- 5 steps
    Template("fence", "{name} fences a rectangular field {L} m long and {W} m wide. Fencing costs ${c} per metre "
             "and a gate costs ${g}. {name} has ${b}. How much money is left after buying the fencing and the "
             "gate?", "Perimeter is twice length plus width; price it, add the gate, take it from the money.",
             {"L": range(10, 61), "W": range(5, 41), "c": range(2, 10), "g": range(20, 151, 10),
              "b": (1000, 1500, 2000, 2500, 3000)},
             lambda v: [s := v["L"] + v["W"], p := 2 * s, f := p * v["c"], t := f + v["g"], v["b"] - t],
             whole=True),
    Template("savings", "{name} has ${s} saved. Every week {name} earns ${e} doing chores and spends ${x} of it. "
             "After {w} weeks, {name} buys a game for ${g} and then gives half of the money left to a {sibling}. "
             "How much money does {name} keep?",
             "Savings per week, over all weeks, plus the start, minus the game, then half.",
             {"s": range(10, 101), "e": range(10, 31), "x": range(2, 16), "w": range(3, 13), "g": range(20, 81)},
             lambda v: [a := v["e"] - v["x"], b := a * v["w"], c := b + v["s"], d := c - v["g"], d / 2],
             {"sibling": ("brother", "sister", "cousin")}),
    Template("library", "A library has {a} books. It buys {b} boxes of {c} books each. Then it lends out {pct}% of "
             "all its books, and {r} of the lent books come back. How many books are in the library now?",
             "New books, all books, books lent, books left, then add those returned.",
             {"a": range(100, 901, 10), "b": range(2, 10), "c": range(10, 41, 5), "pct": (10, 20, 25, 30, 40, 50),
              "r": range(5, 51)},
             lambda v: [n := v["b"] * v["c"], t := v["a"] + n, lent := _pct(t, v["pct"]), k := t - lent, k + v["r"]],
             whole=True, check=lambda v, s: v["r"] < s[2]),
    Template("trip", "{name} drives {d} km to visit a friend at {v1} km per hour, stays {s} hours, and drives home "
             "at {v2} km per hour. {name} left home at {start}:00. At what hour (on a 24-hour clock) does {name} "
             "get home?", "Time there, time back, time driving, time away, then add it to the start.",
             {"d": range(60, 361, 30), "v1": (30, 40, 45, 60, 90), "v2": (30, 40, 45, 60, 90), "s": range(1, 5),
              "start": range(6, 11)},
             lambda v: [t1 := v["d"] / v["v1"], t2 := v["d"] / v["v2"], t := t1 + t2, a := t + v["s"],
                        a + v["start"]], whole=True, check=lambda v, s: s[-1] < 24),
    Template("tiles", "A room is {L} m long and {W} m wide. {name} covers the floor with square tiles {t} cm on a "
             "side. Tiles come in boxes of {b}, and a box costs ${c}. How much do the tiles cost, in dollars?",
             "Tiles along the length, along the width, tiles in all, boxes, then dollars (1 m is 100 cm).",
             {"L": range(2, 9), "W": range(2, 7), "t": (20, 25, 50), "b": (10, 20, 25, 40, 50), "c": range(10, 61)},
             lambda v: [x := v["L"] * 100 / v["t"], y := v["W"] * 100 / v["t"], n := x * y, k := n / v["b"],
                        k * v["c"]], whole=True),
    # --- 6 steps
    Template("party", "{name} is having a party for {g} guests. Each guest will eat {s} slices of pizza; a pizza "
             "has {k} slices and costs ${p}. Drinks cost ${d} per guest. {name} has a coupon for ${off} off the "
             "whole bill. How much does {name} pay, in dollars?",
             "Slices, pizzas, pizza cost, drinks cost, the bill, then the coupon.",
             {"g": range(6, 31), "s": range(2, 5), "k": (6, 8, 10, 12), "p": range(8, 21), "d": range(1, 5),
              "off": (5, 10, 15, 20)},
             lambda v: [n := v["g"] * v["s"], z := n / v["k"], pc := z * v["p"], dc := v["g"] * v["d"],
                        t := pc + dc, t - v["off"]], whole=True),
    Template("farm", "A farmer has {cows} cows and {hens} hens. Each cow gives {m} litres of milk a week and each "
             "hen lays {e} eggs a week. Milk sells for ${pm} a litre and eggs for ${pe} a dozen. How much does the "
             "farmer earn in a week, in dollars?",
             "Litres of milk and its price; eggs, dozens and their price; then add the two.",
             {"cows": range(2, 21), "hens": range(6, 91, 6), "m": range(20, 61, 5), "e": range(3, 8),
              "pm": (1, 2, 3), "pe": range(2, 7)},
             lambda v: [lm := v["cows"] * v["m"], mm := lm * v["pm"], n := v["hens"] * v["e"], dz := n / 12,
                        em := dz * v["pe"], mm + em], whole=True),
    Template("school_trip", "A school has {c} classes of {s} students. {pct}% of the students go on a trip. They fill "
             "buses that seat {cap} each, and each bus costs ${bus} to hire. Entry tickets cost ${t} per "
             "student. What does the trip cost in all, in dollars?",
             "Students, students going, buses, bus cost, ticket cost, then add the two costs.",
             {"c": range(3, 13), "s": range(20, 33), "pct": (20, 25, 40, 50, 60, 75, 80), "cap": (20, 25, 30, 40, 50),
              "bus": range(100, 401, 50), "t": range(3, 13)},
             lambda v: [n := v["c"] * v["s"], g := _pct(n, v["pct"]), b := g / v["cap"], bc := b * v["bus"],
                        tc := g * v["t"], bc + tc], whole=True),
)
BY_ID = {t.id: t for t in TEMPLATES}


def format_number(q: Fraction) -> str:
    """A clean quantity as the answer string: ``42``, ``12.5``, ``3.75`` (never ``42.0``)."""
    if q.denominator == 1:
        return str(q.numerator)
    return f"{float(q):.2f}".rstrip("0")


def split_of(template_id: str, numbers: dict[str, int]) -> str:
    """The split a problem belongs to, by a hash of its template and numbers (names are not part of it)."""
    key = template_id + "|" + ",".join(f"{k}={numbers[k]}" for k in sorted(numbers))
    return SPLITS[hashlib.sha256(key.encode()).digest()[0] % 2]


def render(template: Template, numbers: dict[str, int], rng: random.Random) -> dspy.Example:
    """One problem of ``template`` with these numbers (names and words drawn from ``rng``)."""
    chain = template.values(numbers)
    if chain is None:
        raise ValueError(f"The numbers {numbers} break a constraint of template {template.id!r}.")
    people = rng.sample(NAMES, 3)
    words = {"name": people[0], "name2": people[1], "name3": people[2],
             **{k: rng.choice(options) for k, options in template.words.items()}}
    return dspy.Example(question=template.text.format(**words, **numbers), answer=format_number(chain[-1]),
                        hint=template.hint, steps=len(chain), template=template.id,
                        numbers=dict(numbers)).with_inputs("question")


def generate(n: int = DEFAULT_SIZE, seed: int = 0, split: str = "test", max_tries: int = 10_000) -> list[dspy.Example]:
    """``n`` distinct problems of ``split`` ("dev" or "test"), the same for the same ``seed``.

    Step levels take turns (2, 3, 4, 5, 6, 2, ...), and the templates of a level take turns within it.
    Each example has ``question`` (the only input), ``answer`` (the gold, a number as a string), ``hint``,
    ``steps``, ``template`` and ``numbers`` (the slot values the gold was computed from).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use 'dev' (for tuning) or 'test' (for reported results).")
    if n < 0:
        raise ValueError(f"n must be 0 or more, got {n}.")
    rng = random.Random(f"mathgen:{split}:{seed}")
    levels = {s: [t for t in TEMPLATES if t.steps == s] for s in STEP_LEVELS}
    seen: set[tuple[str, tuple[tuple[str, int], ...]]] = set()
    problems: list[dspy.Example] = []
    for i in range(n):
        level = levels[STEP_LEVELS[i % len(STEP_LEVELS)]]
        template = level[(i // len(STEP_LEVELS)) % len(level)]
        for _ in range(max_tries):
            numbers = {k: rng.choice(options) for k, options in template.numbers.items()}
            key = (template.id, tuple(sorted(numbers.items())))
            if key not in seen and split_of(template.id, numbers) == split and template.values(numbers):
                break
        else:  # pragma: no cover - every template has thousands of valid draws
            raise RuntimeError(f"No new valid numbers for template {template.id!r} in {max_tries} draws; "
                               "ask for fewer problems or widen the template's ranges.")
        seen.add(key)
        problems.append(render(template, numbers, rng))
    return problems
