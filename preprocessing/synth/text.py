"""Utterance text: a class-bearing phrase among emotionally neutral filler."""

from __future__ import annotations

import numpy as np

PHRASES = {
    "anger": [
        "I am so angry with you", "this is completely unfair", "I hate it when you do that", "stop lying to me",
        "you make me furious", "get out of my way", "that is ridiculous", "I am sick of your excuses",
        "how dare you say that", "this is outrageous", "leave me alone right now", "you never listen to me",
    ],
    "happiness": [
        "I am so happy for you", "this is wonderful news", "I love it", "what a great day",
        "that is amazing", "I am really glad you came", "we did it", "you look fantastic",
        "this is the best thing ever", "I am so excited", "that made me laugh", "what a lovely surprise",
    ],
    "neutral": [
        "the meeting is at noon", "I put the keys on the table", "the bus leaves at seven",
        "we need two more chairs", "the report is in the folder", "it is on the second floor",
        "I will call them tomorrow", "the store closes at nine", "she moved to another office",
        "the form has three pages", "I read the instructions", "the train was on time",
    ],
    "sadness": [
        "I miss her so much", "I feel so alone", "I am sorry it ended like this", "everything is gone",
        "nobody came to see me", "I lost my job today", "I cannot stop crying", "it hurts so much",
        "he is never coming back", "I feel sad all the time", "I wish things were different",
        "we used to be so close",
    ],
}
OPENERS = ["well", "listen", "you know", "so", "honestly", "look", "anyway", "I mean", "okay"]
CLAUSES = [
    "about the car", "after the call", "with your brother", "at the office", "before dinner",
    "on the way home", "about the money", "since last week", "in the kitchen", "after the meeting",
]
ENDINGS = {"anger": "!", "happiness": "!", "neutral": ".", "sadness": "..."}


def sentences(rng: np.random.Generator, emotion: str, seconds: float, count: int | None = None) -> list[str]:
    """`count` (default: one, or two for long utterances) sentences showing `emotion`."""
    if count is None:
        count = 2 if seconds > 3.5 and rng.random() < 0.6 else 1
    out = []
    for i in range(count):
        words = PHRASES[emotion][int(rng.integers(len(PHRASES[emotion])))]
        if i == 0 and rng.random() < 0.5:
            words = f"{OPENERS[int(rng.integers(len(OPENERS)))]}, {words}"
        if seconds > 2.0 and rng.random() < 0.5:
            words = f"{words} {CLAUSES[int(rng.integers(len(CLAUSES)))]}"
        ending = ENDINGS[emotion] if rng.random() < 0.7 else "."
        out.append(words[0].upper() + words[1:] + ending)
    return out


def short_sentence(rng: np.random.Generator) -> str:
    """A one-word exclamation for cues under a second."""
    return ["Hey.", "What?", "No.", "Okay.", "Wait.", "Really?"][int(rng.integers(6))]
