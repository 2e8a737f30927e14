"""PTB-style tokenisation of captions as coco-caption prepares them for BLEU and CIDEr, in plain Python.

coco-caption runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`, Java) and drops the
punctuation tokens of `PUNCTUATIONS`. This module follows that tokenizer's rules for what captions contain: clitics
split off (`does n't`, `ca n't`, `man 's`, `she 'd 've`, `can not`, `gon na`), punctuation split from words but kept
inside numbers (`3,000`, `5:30`, `2.5`) and hyphenated or slashed words (`black-and-white`, `1/2`), abbreviations
keep their period (`u.s.`, `mr.`, `a.m.`, initials), brackets written `-lrb-` etc. (lowercased, so coco-caption keeps
them), quotes removed. tests/.../fixtures/reference.json holds the Java tokenizer's output on the bundled captions and
harder sentences; this tokenizer matches it on all of them. Rarer constructs (URLs, emoticons, `y'all`, `'tis`) may
differ from the Java tokenizer.
"""

from __future__ import annotations

import re

# The tokens coco-caption removes after tokenising (bracket names are uppercase there, so lowercased ones stay).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {
    "\u201c": '"',
    "\u201d": '"',
    "\u2018": "'",
    "\u2019": "'",
    "\u2014": " -- ",
    "\u2013": " -- ",
    "\u2026": "...",
}
# Abbreviations whose period stays on the word (the tokenizer's list is longer; these are the ones captions use).
_ABBREVIATION_WORDS = """mr mrs ms dr st jr sr mt vs etc inc co ltd prof gen col capt sgt lt rev ave blvd dept est fig
no jan feb mar apr jun jul aug sep sept oct nov dec"""
_ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())
_WHOLE = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")

# A word: word characters joined by - . / + & (when a word character follows), by an apostrophe before a letter
# (o'clock, don't: clitics are split off later) and by , or : between digits (3,000, 5:30). A sign or a decimal point
# may start a number after a space or an opening bracket, an apostrophe a decade ('90s).
_WORD = (
    r"(?:(?<![^\s(\[{])[+-](?=\d)|(?<![\w.])\.(?=\d)|'(?=\d\d))?\w+(?:(?:[-./+&]|'(?=[^\W\d_])|(?<=\d)[,:](?=\d))\w+)*"
)
_TOKEN = re.compile(rf"(?P<word>{_WORD})|(?P<dots>\.\.+)|(?P<dashes>--+|-(?=-))|(?P<marks>[!?]+)|(?P<other>\S)")
_LETTER_DOTS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")


def _split_clitics(word: str) -> list[str]:
    """`doesn't` -> does n't, `she'd've` -> she 'd 've, `cannot` -> can not; other words whole."""
    if word.lower() in _WHOLE:
        return list(_WHOLE[word.lower()])
    tail: list[str] = []
    while True:
        lower = word.lower()
        clitic = next((c for c in _CLITICS if lower.endswith(c) and len(word) > len(c)), None)
        if clitic is None:
            return [word, *tail]
        word, tail = word[: -len(clitic)], [word[-len(clitic) :], *tail]


def _tokens(text: str) -> list[str]:
    for source, target in _UNICODE.items():
        text = text.replace(source, target)
    out: list[str] = []
    pos = 0
    while (match := _TOKEN.search(text, pos)) is not None:
        pos = match.end()
        kind, token = match.lastgroup, match.group()
        if kind == "word":
            if text[pos : pos + 1] == "." and text[pos + 1 : pos + 2] != "." and _keeps_period(token):
                out.append(token + ".")
                pos += 1
            else:
                out.extend(_split_clitics(token))
        elif kind == "dots":
            out.append("..." if len(token) > 2 else ". .")  # the Java tokenizer writes `..` as two periods
        elif kind == "dashes":
            out.append("--")
        else:
            out.append(_BRACKETS.get(token, token))
    return out


def _keeps_period(word: str) -> bool:
    """An abbreviation or an initial: u.s, e.g, a.m, single letters, mr, etc."""
    return _LETTER_DOTS.fullmatch(word) is not None or word.lower() in _ABBREVIATIONS


def tokenize_caption(text: str) -> str:
    """One caption as coco-caption scores it: PTB tokens, lowercased, punctuation tokens removed, space-joined."""
    tokens = " ".join(_tokens(text.replace("\n", " "))).lower().split()
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t not in ('"',))
