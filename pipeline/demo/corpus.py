"""A generated, English-like corpus of short chats and their one-sentence summaries.

Everything comes from one ``random.Random(seed)``, so a seed gives the same rows everywhere.
Each scenario (meeting up, rescheduling, borrowing, helping, running late, shopping) samples
its slots (two names, a place, a day, ...), writes a short dialogue from several paraphrases
per turn, and one templated summary that can only be written by reading the dialogue.

The builder makes:

* SFT pairs ``{"dialogue", "summary"}`` (train and a held-out eval split),
* preference pairs ``{"prompt", "chosen", "rejected"}`` whose rejected side is a worse summary
  (truncated, rambling, off topic, or with the wrong names/place/day),
* PPO prompts ``{"prompt"}`` (dialogues alone),
* raw warm-up documents: dialogues and summaries as *separate* texts, never joined by the
  ``Summary:`` prompt, so a base model knows the language but not the task.

All dialogues of all splits are distinct, so held-out rows are never seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from raypeft.pipeline.demo.settings import DemoSettings

NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
    "Maria", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Adam", "Bella",
    "Chris", "Diana", "Eric", "Fiona", "George", "Hannah", "Ivan", "Julia", "Kevin", "Laura", "Mark",
    "Nina", "Oscar", "Peter", "Ruby", "Simon", "Tom", "Lucy", "Max", "Sophie", "Daniel", "Eva", "Frank",
    "Helen", "Jonas", "Lena", "Martin",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["cafe", "library", "park", "gym", "cinema", "station", "office", "museum", "beach", "bakery",
          "market", "restaurant", "bookshop", "pool", "garden"]
ACTIVITIES = ["lunch", "coffee", "dinner", "breakfast", "a walk", "a run", "a movie", "tennis", "chess",
              "a swim", "study group", "band practice"]
TIMES = ["nine", "ten", "eleven", "noon", "one", "two", "three", "four", "five", "six", "seven", "eight"]
ITEMS = ["bike", "camera", "laptop", "tent", "drill", "umbrella", "guitar", "ladder", "projector",
         "suitcase", "charger", "blender"]
TASKS = ["move house", "paint the kitchen", "fix the sink", "build a shelf", "plan the party",
         "clean the garage", "study for the exam", "write the report", "wash the car", "pack the boxes"]
TRANSPORT = ["bus", "train", "tram", "ferry", "taxi"]
MINUTES = ["five", "ten", "fifteen", "twenty", "thirty", "forty"]
FOODS = ["bread", "milk", "apples", "eggs", "cheese", "rice", "coffee beans", "tomatoes", "butter",
         "oranges", "pasta", "tea"]
SHOPS = ["market", "bakery", "supermarket", "corner shop", "farm shop"]

OFF_TOPIC = [
    "The weather was cold and grey all week long.",
    "Nobody knows why the old clock in the hall stopped.",
    "Cats sleep for most of the day and hunt at night.",
    "The river flows slowly through the quiet valley.",
    "Many people enjoy reading a good book in the evening.",
    "The mountains were covered in fresh white snow.",
    "A new phone comes out every year with a bigger screen.",
    "The garden is full of red and yellow flowers in spring.",
]
RAMBLE = ["and so on", "and then", "you know", "anyway", "well"]


def _pick(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


def _time_phrase(t: str) -> str:
    return "noon" if t == "noon" else f"{t} o'clock"


@dataclass(frozen=True)
class Scenario:
    name: str
    sample: Callable[[random.Random], dict[str, str]]
    dialogue: Callable[[dict[str, str], random.Random], list[tuple[str, str]]]  # (speaker, line)
    summary: Callable[[dict[str, str]], str]
    swappable: tuple[str, ...]  # slots a "wrong details" corruption may change


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


# --- meet up -----------------------------------------------------------------------------

def _meet_sample(rng):
    a, b = _two_names(rng)
    return {"a": a, "b": b, "place": _pick(rng, PLACES), "day": _pick(rng, DAYS),
            "activity": _pick(rng, ACTIVITIES), "time": _pick(rng, TIMES)}


def _meet_dialogue(f, rng):
    t = _time_phrase(f["time"])
    first = _pick(rng, [
        f"Are we still on for {f['activity']} on {f['day']}?",
        f"Do you want to go for {f['activity']} on {f['day']}?",
        f"Hi {f['b']}, are you free for {f['activity']} on {f['day']}?",
        f"Hey, how about {f['activity']} on {f['day']}?",
    ])
    second = _pick(rng, [
        f"Yes, let's meet at the {f['place']} at {t}.",
        f"Sure! How about the {f['place']} at {t}?",
        f"Sounds good. The {f['place']} at {t}?",
        f"Of course. I will wait for you at the {f['place']} at {t}.",
    ])
    lines = [(f["a"], first), (f["b"], second)]
    if rng.random() < 0.7:
        lines.append((f["a"], _pick(rng, ["Perfect, see you there.", "Great, see you then!",
                                          f"Okay, the {f['place']} it is.", "Deal. See you soon."])))
    return lines


def _meet_summary(f):
    return f"{f['a']} and {f['b']} will meet at the {f['place']} on {f['day']} for {f['activity']}."


# --- reschedule --------------------------------------------------------------------------

def _resched_sample(rng):
    a, b = _two_names(rng)
    day, day2 = rng.sample(DAYS, 2)
    return {"a": a, "b": b, "place": _pick(rng, PLACES), "day": day, "day2": day2,
            "activity": _pick(rng, ACTIVITIES)}


def _resched_dialogue(f, rng):
    lines = [
        (f["a"], _pick(rng, [
            f"Hi {f['b']}, I can't make it to {f['activity']} on {f['day']}.",
            f"Sorry {f['b']}, something came up and I have to cancel {f['activity']} on {f['day']}.",
            f"Bad news, I am busy on {f['day']} so I can't do {f['activity']}.",
        ])),
        (f["b"], _pick(rng, [
            f"No problem. How about {f['day2']} instead?",
            f"That's okay. Can we do {f['day2']}?",
            f"Oh well. Are you free on {f['day2']}?",
        ])),
        (f["a"], _pick(rng, [
            f"{f['day2']} works for me. Same place, the {f['place']}?",
            f"Yes, {f['day2']} is fine. Let's meet at the {f['place']}.",
            f"{f['day2']} is perfect. The {f['place']} again?",
        ])),
    ]
    if rng.random() < 0.6:
        lines.append((f["b"], _pick(rng, ["Yes, see you there.", "Sure, see you then.", "Great!"])))
    return lines


def _resched_summary(f):
    return (f"{f['a']} cannot come to {f['activity']} on {f['day']}, so {f['a']} and {f['b']} "
            f"will meet at the {f['place']} on {f['day2']} instead.")


# --- borrow ------------------------------------------------------------------------------

def _borrow_sample(rng):
    a, b = _two_names(rng)
    return {"a": a, "b": b, "item": _pick(rng, ITEMS), "place": _pick(rng, PLACES), "day": _pick(rng, DAYS)}


def _borrow_dialogue(f, rng):
    lines = [
        (f["a"], _pick(rng, [
            f"{f['b']}, could I borrow your {f['item']}?",
            f"Hey {f['b']}, do you still have that {f['item']}? I need one.",
            f"Can I use your {f['item']} for a few days?",
        ])),
        (f["b"], _pick(rng, [
            f"Sure, I can bring it to the {f['place']} on {f['day']}.",
            f"Of course. I will drop it off at the {f['place']} on {f['day']}.",
            f"Yes, no problem. Meet me at the {f['place']} on {f['day']} and it is yours.",
        ])),
    ]
    if rng.random() < 0.7:
        lines.append((f["a"], _pick(rng, ["Thanks a lot!", "You are the best, thank you.",
                                          "Great, I will give it back next week."])))
    return lines


def _borrow_summary(f):
    return f"{f['b']} will lend {f['a']} the {f['item']} and bring it to the {f['place']} on {f['day']}."


# --- help --------------------------------------------------------------------------------

def _help_sample(rng):
    a, b = _two_names(rng)
    return {"a": a, "b": b, "task": _pick(rng, TASKS), "day": _pick(rng, DAYS), "time": _pick(rng, TIMES)}


def _help_dialogue(f, rng):
    t = _time_phrase(f["time"])
    lines = [
        (f["a"], _pick(rng, [
            f"Can you help me {f['task']} on {f['day']}?",
            f"{f['b']}, I need a hand to {f['task']} on {f['day']}. Are you free?",
            f"Would you help me {f['task']}? I was thinking {f['day']}.",
        ])),
        (f["b"], _pick(rng, [
            f"Of course. I can come at {t}.",
            f"Sure, I will be there at {t}.",
            f"Yes, {f['day']} is fine. Is {t} okay?",
        ])),
    ]
    if rng.random() < 0.7:
        lines.append((f["a"], _pick(rng, ["Thank you so much!", f"{t.capitalize()} is great, thanks.",
                                          "You are a star."])))
    return lines


def _help_summary(f):
    return f"{f['b']} will help {f['a']} {f['task']} on {f['day']} at {_time_phrase(f['time'])}."


# --- running late ------------------------------------------------------------------------

def _late_sample(rng):
    a, b = _two_names(rng)
    return {"a": a, "b": b, "transport": _pick(rng, TRANSPORT), "place": _pick(rng, PLACES),
            "minutes": _pick(rng, MINUTES)}


def _late_dialogue(f, rng):
    lines = [
        (f["a"], _pick(rng, [
            f"I am running late, sorry! The {f['transport']} is delayed.",
            f"Sorry {f['b']}, my {f['transport']} is late.",
            f"Bad luck today, the {f['transport']} is stuck. I will be late.",
        ])),
        (f["b"], _pick(rng, [
            f"No worries. I am already at the {f['place']}.",
            f"That's fine, I will wait at the {f['place']}.",
            f"Okay. I am sitting at the {f['place']}. How long will you be?",
        ])),
        (f["a"], _pick(rng, [
            f"I will be there in {f['minutes']} minutes.",
            f"Give me {f['minutes']} minutes.",
            f"About {f['minutes']} minutes, I think.",
        ])),
    ]
    return lines


def _late_summary(f):
    return (f"{f['a']} is late because the {f['transport']} is delayed and will reach {f['b']} "
            f"at the {f['place']} in {f['minutes']} minutes.")


# --- shopping ----------------------------------------------------------------------------

def _shop_sample(rng):
    a, b = _two_names(rng)
    return {"a": a, "b": b, "shop": _pick(rng, SHOPS), "food": _pick(rng, FOODS), "day": _pick(rng, DAYS)}


def _shop_dialogue(f, rng):
    lines = [
        (f["a"], _pick(rng, [
            f"I am going to the {f['shop']} on {f['day']}. Do you need anything?",
            f"{f['b']}, I will stop at the {f['shop']} on {f['day']}. Want something?",
            f"Shopping trip to the {f['shop']} on {f['day']}! Anything for you?",
        ])),
        (f["b"], _pick(rng, [
            f"Yes, could you get me some {f['food']}?",
            f"Oh, I am out of {f['food']}. Could you buy some?",
            f"Some {f['food']} would be great, thanks.",
        ])),
    ]
    if rng.random() < 0.7:
        lines.append((f["a"], _pick(rng, [f"Sure, I will get {f['food']} for you.", "No problem.",
                                          "Okay, consider it done."])))
    return lines


def _shop_summary(f):
    return f"{f['a']} will buy some {f['food']} for {f['b']} at the {f['shop']} on {f['day']}."


SCENARIOS: list[Scenario] = [
    Scenario("meet", _meet_sample, _meet_dialogue, _meet_summary, ("a", "b", "place", "day", "activity")),
    Scenario("reschedule", _resched_sample, _resched_dialogue, _resched_summary, ("a", "b", "place", "day2")),
    Scenario("borrow", _borrow_sample, _borrow_dialogue, _borrow_summary, ("a", "b", "item", "place", "day")),
    Scenario("help", _help_sample, _help_dialogue, _help_summary, ("a", "b", "task", "day")),
    Scenario("late", _late_sample, _late_dialogue, _late_summary, ("a", "b", "transport", "place", "minutes")),
    Scenario("shop", _shop_sample, _shop_dialogue, _shop_summary, ("a", "b", "food", "shop", "day")),
]

_SLOT_POOLS = {"a": NAMES, "b": NAMES, "place": PLACES, "day": DAYS, "day2": DAYS, "activity": ACTIVITIES,
               "item": ITEMS, "task": TASKS, "transport": TRANSPORT, "minutes": MINUTES, "food": FOODS,
               "shop": SHOPS}


@dataclass(frozen=True)
class Example:
    scenario: str
    dialogue: str
    summary: str
    slots: dict


def render_dialogue(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"{speaker}: {text}" for speaker, text in lines)


def sample_example(rng: random.Random) -> Example:
    sc = SCENARIOS[rng.randrange(len(SCENARIOS))]
    slots = sc.sample(rng)
    return Example(sc.name, render_dialogue(sc.dialogue(slots, rng)), sc.summary(slots), slots)


_BY_NAME = {sc.name: sc for sc in SCENARIOS}


def worse_summary(ex: Example, rng: random.Random) -> str:
    """A rejected response: truncated, rambling, off topic, or with wrong details."""
    good = ex.summary
    kind = rng.random()
    words = good.split()
    if kind < 0.25:  # truncated mid-sentence
        return " ".join(words[: rng.randint(2, max(2, len(words) // 2))])
    if kind < 0.5:  # rambling: copies a chat line and trails off
        line = ex.dialogue.split("\n")[rng.randrange(ex.dialogue.count("\n") + 1)]
        text = line.split(": ", 1)[1]
        filler = _pick(rng, RAMBLE)
        return f"{filler} {text} {filler} {text.lower()} {filler}"
    if kind < 0.75:  # off topic
        return _pick(rng, OFF_TOPIC)
    # wrong details: two slots replaced by values absent from the chat
    sc = _BY_NAME[ex.scenario]
    slots = dict(ex.slots)
    for slot in rng.sample(sc.swappable, 2):
        pool = [v for v in _SLOT_POOLS[slot] if v not in slots.values() and v not in ex.dialogue]
        slots[slot] = _pick(rng, pool or [v for v in _SLOT_POOLS[slot] if v != slots[slot]])
    return sc.summary(slots)


@dataclass
class Corpus:
    sft_train: list[dict]
    sft_eval: list[dict]
    preference_train: list[dict]
    preference_eval: list[dict]
    prompts: list[dict]
    raw_documents: list[str]

    def files(self) -> dict[str, list[dict]]:
        return {"sft_train": self.sft_train, "sft_eval": self.sft_eval,
                "preference_train": self.preference_train, "preference_eval": self.preference_eval,
                "prompts": self.prompts}


DEMO_SYSTEM_PROMPT = "Summarize the chat in one sentence."


def as_conversation(dialogue: str, summary: str) -> dict[str, list[dict[str, str]]]:
    """An SFT row as a conversation row ``{"messages": [system, user, assistant]}``: the demo's
    conversational form (``data.format: chat``), made from the same rows as the text form."""
    return {"messages": [{"role": "system", "content": DEMO_SYSTEM_PROMPT},
                         {"role": "user", "content": dialogue},
                         {"role": "assistant", "content": summary}]}


def as_prompt_conversation(dialogue: str) -> list[dict[str, str]]:
    """A demo prompt (a dialogue) as the conversation a reply continues: ``[system, user]``."""
    return as_conversation(dialogue, "")["messages"][:2]


def generate_corpus(settings: DemoSettings) -> Corpus:
    """All splits, deterministic from ``settings.seed``; no dialogue appears in two rows."""
    rng = random.Random(f"raypeft-demo-{settings.seed}")
    seen: set[str] = set()

    def fresh(n: int) -> list[Example]:
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError("demo corpus: ran out of distinct dialogues")
            ex = sample_example(rng)
            if ex.dialogue in seen:
                continue
            seen.add(ex.dialogue)
            out.append(ex)
        return out

    # held-out splits first, so changing a train size never changes them
    sft_eval = [{"dialogue": e.dialogue, "summary": e.summary} for e in fresh(settings.sft_eval)]
    pref_eval = [{"prompt": e.dialogue, "chosen": e.summary, "rejected": worse_summary(e, rng)}
                 for e in fresh(settings.preference_eval)]
    sft_train = [{"dialogue": e.dialogue, "summary": e.summary} for e in fresh(settings.sft_train)]
    pref_train = [{"prompt": e.dialogue, "chosen": e.summary, "rejected": worse_summary(e, rng)}
                  for e in fresh(settings.preference_train)]
    prompts = [{"prompt": e.dialogue} for e in fresh(settings.prompts)]
    raw = [e.dialogue for e in fresh(settings.raw_dialogues)]
    raw += [e.summary for e in fresh(settings.raw_summaries)]
    raw += OFF_TOPIC
    random.Random(f"raypeft-demo-raw-{settings.seed}").shuffle(raw)
    return Corpus(sft_train, sft_eval, pref_train, pref_eval, prompts, raw)
