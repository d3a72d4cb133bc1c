"""A labelled text set the benchmarks generate themselves (no text corpus ships with the
project): five topics, sentences made of templates x slot words, with a test set whose
phrasing never occurs in training.

Each sentence fills a template with a topic noun phrase (`thing`), for some templates a
topic event (`event`), and a neutral person (`who`, shared by all topics and both sets, so
it carries no label). The templates, the topic nouns and the topic events are each split
in two: training sentences use only the training halves, test sentences only the held-out
halves. A test sentence therefore has a template, a topic noun and an event that no
training sentence has; only the neutral persons and the topics themselves are shared.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from transfer.datasets import Dataset, from_arrays

WHO = (
    "my sister",
    "a colleague",
    "the neighbour",
    "my old friend",
    "our manager",
    "the taxi driver",
    "my cousin",
    "a stranger on the train",
    "the teacher",
    "my father",
)

# Per topic: 16 noun phrases (the last 5 held out) and 10 events (the last 3 held out).
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sport": (
        (
            "the football match",
            "the league table",
            "the marathon results",
            "our tennis coach",
            "the new goalkeeper",
            "the cycling race",
            "the basketball final",
            "the swimming championship",
            "the rugby transfer news",
            "the cricket score",
            "the boxing rematch",
            "the ski jumping event",
            "the hockey playoffs",
            "the golf tournament",
            "the volleyball team",
            "the relay runners",
        ),
        (
            "the striker scored twice",
            "the team trained in the rain",
            "the referee showed a red card",
            "we ran ten kilometres",
            "the keeper saved a penalty",
            "the coach changed the lineup",
            "she won the sprint",
            "the fans sang all night",
            "the match went to extra time",
            "he broke the world record",
        ),
    ),
    "food": (
        (
            "the pasta recipe",
            "the new bakery",
            "my grandmother's soup",
            "the spicy curry",
            "the chocolate cake",
            "the farmers market",
            "the sourdough starter",
            "the vegetable stew",
            "the sushi restaurant",
            "the breakfast menu",
            "the roast chicken",
            "the lemon tart",
            "the garlic bread",
            "the pancake batter",
            "the tomato sauce",
            "the cheese platter",
        ),
        (
            "we baked fresh bread",
            "she burnt the onions",
            "the oven stopped heating",
            "we added too much salt",
            "the soup simmered for hours",
            "he chopped the herbs",
            "the dough failed to rise",
            "we tasted the new wine",
            "the chef plated dessert",
            "I grilled the vegetables",
        ),
    ),
    "tech": (
        (
            "the laptop update",
            "the database migration",
            "the new phone",
            "the server outage",
            "the password manager",
            "the software release",
            "the cloud bill",
            "the broken keyboard",
            "the operating system upgrade",
            "the wifi router",
            "the mobile app",
            "the security patch",
            "the graphics card",
            "the backup drive",
            "the printer driver",
            "the programming language",
        ),
        (
            "the server crashed",
            "the build failed overnight",
            "we rebooted the router",
            "the app kept freezing",
            "I reinstalled the drivers",
            "the disk filled up",
            "the website went down",
            "we patched the firewall",
            "the battery drained quickly",
            "the code would not compile",
        ),
    ),
    "weather": (
        (
            "the storm warning",
            "the heatwave",
            "tomorrow's forecast",
            "the heavy snowfall",
            "the flood alert",
            "the thunderstorm",
            "the morning fog",
            "the hurricane season",
            "the cold front",
            "the drought",
            "the hailstorm",
            "the rainy season",
            "the strong winds",
            "the frost last night",
            "the humidity",
            "the tornado watch",
        ),
        (
            "it rained all afternoon",
            "the river burst its banks",
            "the temperature dropped below zero",
            "the wind tore down a fence",
            "the sun finally came out",
            "lightning hit the old oak",
            "the roads iced over",
            "a blizzard closed the pass",
            "the clouds cleared by noon",
            "thunder kept us awake",
        ),
    ),
    "money": (
        (
            "the mortgage rate",
            "the stock market",
            "my tax return",
            "the pension fund",
            "the bank loan",
            "the quarterly earnings",
            "the credit card bill",
            "the savings account",
            "the inflation report",
            "the currency exchange",
            "the insurance premium",
            "the company shares",
            "the household budget",
            "the interest payments",
            "the investment portfolio",
            "the salary review",
        ),
        (
            "the shares fell sharply",
            "the bank raised its rates",
            "we paid off the loan",
            "the invoice was overdue",
            "the market rallied",
            "I moved my savings",
            "the dividend was cut",
            "prices rose again",
            "the accountant filed the return",
            "the bond yields climbed",
        ),
    ),
}

TRAIN_TEMPLATES = (
    "{who} told me that {event}, and now we keep talking about {thing}.",
    "after {event}, {who} wanted to hear all about {thing}.",
    "I heard from {who} that {event}; what does that mean for {thing}?",
    "{who} could not stop discussing {thing} after {event}.",
    "apparently {event}, so {who} asked me about {thing} again.",
    "{who} spent the whole evening reading about {thing}.",
    "can {who} tell me more about {thing}?",
    "{who} sent me a long message about {thing} this morning.",
    "there was a report about {thing}, and {who} shared it with me.",
    "{who} mentioned that {event}.",
)
TEST_TEMPLATES = (
    "last week {event}, which is why {who} brought up {thing} at dinner.",
    "{who} phoned to say {event} and to ask about {thing}.",
    "during the meeting {who} kept bringing up {thing}.",
    "did {who} hear that {event}?",
)
HELD_OUT_THINGS = 5
HELD_OUT_EVENTS = 3


@dataclass(frozen=True)
class TextSets:
    train: Dataset  # training pool (the fine-tune splits off its validation part from it)
    test: Dataset  # held-out phrasing: never trained, early-stopped or calibrated on

    def describe(self) -> str:
        return (
            f"{len(TOPICS)} topics; training pool {len(self.train)} sentences "
            f"({len(TRAIN_TEMPLATES)} templates, {16 - HELD_OUT_THINGS} nouns and "
            f"{10 - HELD_OUT_EVENTS} events per topic); test {len(self.test)} sentences from "
            f"{len(TEST_TEMPLATES)} other templates, {HELD_OUT_THINGS} other nouns and "
            f"{HELD_OUT_EVENTS} other events per topic"
        )


def _sentences(
    templates: tuple[str, ...],
    things: tuple[str, ...],
    events: tuple[str, ...],
    count: int,
    rng: np.random.Generator,
) -> list[str]:
    """`count` distinct sentences drawn from every filling of `templates` (fewer if fewer
    exist)."""
    filled: list[str] = []
    for template in templates:
        uses_event = "{event}" in template
        for who, thing, event in itertools.product(
            WHO, things, events if uses_event else events[:1]
        ):
            text = template.format(who=who, thing=thing, event=event)
            filled.append(text[0].upper() + text[1:])
    unique = sorted(set(filled))
    picked = rng.permutation(len(unique))[:count]
    return [unique[i] for i in sorted(picked)]


def make_text_sets(
    train_per_class: int = 160, test_per_class: int = 100, seed: int = 0
) -> TextSets:
    """The training pool and the held-out-phrasing test set, `*_per_class` sentences of each
    topic (seeded)."""
    rng = np.random.default_rng(seed)
    names = tuple(TOPICS)
    train_x: list[str] = []
    train_y: list[int] = []
    test_x: list[str] = []
    test_y: list[int] = []
    for label, (things, events) in enumerate(TOPICS.values()):
        train = _sentences(
            TRAIN_TEMPLATES,
            things[:-HELD_OUT_THINGS],
            events[:-HELD_OUT_EVENTS],
            train_per_class,
            rng,
        )
        test = _sentences(
            TEST_TEMPLATES,
            things[-HELD_OUT_THINGS:],
            events[-HELD_OUT_EVENTS:],
            test_per_class,
            rng,
        )
        train_x += train
        train_y += [label] * len(train)
        test_x += test
        test_y += [label] * len(test)
    assert not set(train_x) & set(test_x)
    return TextSets(
        train=from_arrays(
            np.array(train_x, dtype=object), np.array(train_y), names, source="generated-text:train"
        ),
        test=from_arrays(
            np.array(test_x, dtype=object), np.array(test_y), names, source="generated-text:test"
        ),
    )
