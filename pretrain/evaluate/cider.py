"""CIDEr-D of generated captions against references, with the COCO caption tokenisation.

The score is pycocoevalcap's `CiderScorer` (the COCO caption evaluation's own implementation,
pinned in requirements.txt): tf-idf weighted n-grams (n = 1..4) with document frequencies over
the references of the evaluated set, clipped counts, a Gaussian length penalty (sigma 6), x10.
Like every CIDEr, it depends on the evaluated set through the idf: compare models on one set.

Tokenisation before scoring, as the COCO evaluation does it: `ptb` runs the Stanford PTB
tokenizer shipped with pycocoevalcap (needs `java` on PATH) and drops punctuation tokens;
`python` is our Java-free equivalent (lower case, PTB-style splitting of punctuation and of
clitics such as "n't" and "'s", acronyms and common abbreviations keep their period, punctuation
tokens dropped; tests/test_evaluate_metrics.py checks
it against the Java tokenizer on typical captions where Java is available); `auto` picks `ptb`
when Java is found, else `python`. The tokenizer used is part of every result.
"""
from __future__ import annotations

import re
import shutil

# The punctuation tokens the COCO evaluation removes after PTB tokenisation.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                             ",", ":", "-", "--", "...", ";"])
TOKENIZERS = ("auto", "ptb", "python")

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_LEADING = "\"'`([{"
_TRAILING = ".,;:!?\"')]}"
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_ACRONYM = re.compile(r"^([a-z]\.)+[a-z]?$")  # u.s, p.m (their last period is kept)
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc co ltd mt ft ave no prof gen sgt".split())


def _word_tokens(word: str) -> list[str]:
    """PTB tokens of one whitespace-separated word (already lower case)."""
    head: list[str] = []
    while word and word[0] in _LEADING:
        head.append(_BRACKETS.get(word[0], "``" if word[0] == '"' else word[0]))
        word = word[1:]
    tail: list[str] = []
    while word and word[-1] in _TRAILING:
        if word.endswith("..."):
            tail.insert(0, "...")
            word = word[:-3]
            continue
        if word[-1] == "." and (_ACRONYM.match(word[:-1]) or word[:-1] in _ABBREVIATIONS):
            break  # "p.m." and "st." keep their period
        tail.insert(0, _BRACKETS.get(word[-1], "''" if word[-1] == '"' else word[-1]))
        word = word[:-1]
    middle: list[str] = []
    for part in re.split(r"(--|\.\.\.)", word):
        m = _CLITIC.match(part)
        middle += [m.group(1), m.group(2)] if m else [part]
    return head + [t for t in middle if t] + tail


def python_tokenize(caption: str) -> str:
    """A caption as the COCO evaluation tokenises it (lower case, tokens joined by spaces).
    Brackets become -lrb- etc. and stay, as they do with Java PTB under -lowerCase."""
    tokens = [t for w in caption.replace("\n", " ").lower().split() for t in _word_tokens(w)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def resolve_tokenizer(name: str) -> str:
    if name not in TOKENIZERS:
        raise ValueError(f"caption tokenizer {name!r}: expected one of {TOKENIZERS}")
    if name == "auto":
        return "ptb" if shutil.which("java") else "python"
    if name == "ptb" and not shutil.which("java"):
        raise RuntimeError("caption tokenizer 'ptb' needs java on PATH (apt-get install default-jre-headless); "
                           "or use --tokenizer python")
    return name


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> dict[object, list[str]]:
    """{id: [caption, ...]} -> {id: [tokenised caption, ...]}."""
    tokenizer = resolve_tokenizer(tokenizer)
    if tokenizer == "python":
        return {k: [python_tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def cider_d(candidates: dict, references: dict, tokenizer: str = "auto") -> dict:
    """Corpus CIDEr-D: {"cider": mean, "per_image": {id: score}, "tokenizer": used}.

    candidates: {id: generated caption}; references: {id: [reference captions]}, same ids."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    if set(candidates) != set(references):
        missing = sorted(set(references) ^ set(candidates), key=str)[:5]
        raise ValueError(f"cider_d: candidates and references cover different ids (e.g. {missing})")
    if not candidates:
        raise ValueError("cider_d: nothing to score")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"cider_d: no reference caption for ids {empty[:5]}")
    used = resolve_tokenizer(tokenizer)
    ids = list(candidates)
    cand = tokenize_captions({k: [candidates[k]] for k in ids}, used)
    refs = tokenize_captions({k: list(references[k]) for k in ids}, used)
    scorer = CiderScorer(n=4, sigma=6.0)
    for k in ids:
        scorer += (cand[k][0], refs[k])
    mean, per_image = scorer.compute_score()
    return {"cider": float(mean), "per_image": {k: float(s) for k, s in zip(ids, per_image)},
            "tokenizer": used}
