"""Captioning and VQA metrics against hand-computed values and an independent CIDEr-D.

    python -m pytest tests/test_evaluate_metrics.py -q
"""
from __future__ import annotations

import math
import random
import shutil
from collections import Counter

import pytest

from pretrain.evaluate.cider import cider_d, python_tokenize, tokenize_captions
from pretrain.evaluate.vqa_metric import normalize_answer, vqa_accuracy


def test_cider_hand_computed():
    # Two images. idf = log(2 / df): "a" occurs in both images' references (idf 0), every other
    # n-gram in one (idf log 2). Image 1: candidate and reference share "cat" and "a cat" with the
    # same weights, so the cosine is 1 for n = 1, 2 and 0 for n = 3, 4 (no such n-grams): CIDEr-D
    # = 10 * (1 + 1 + 0 + 0) / 4 = 5. Image 2: the only shared n-gram is "a" (weight 0): 0.
    out = cider_d({1: "A cat!", 2: "a cat"}, {1: ["a cat."], 2: ["A dog"]}, tokenizer="python")
    assert out["per_image"] == pytest.approx({1: 5.0, 2: 0.0}, abs=1e-12)
    assert out["cider"] == pytest.approx(2.5, abs=1e-12)
    assert out["tokenizer"] == "python"
    # Length penalty: one extra word (delta 1) on image 1 multiplies by exp(-1/72) and the extra
    # unigram "big" (idf log 2, absent from the reference) adds to the candidate's norm: n = 1:
    # log2^2 / (sqrt(2) log2 * log2) = 1/sqrt(2); n = 2: "a big", "big cat" replace "a cat" -> 0.
    out = cider_d({1: "a big cat", 2: "a cat"}, {1: ["a cat"], 2: ["a dog"]}, tokenizer="python")
    assert out["per_image"][1] == pytest.approx(10 * (1 / math.sqrt(2)) / 4 * math.exp(-1 / 72), abs=1e-12)


def cider_d_reference(cands: dict, refs: dict, sigma: float = 6.0) -> dict:
    """CIDEr-D as Vedantam et al. (2015) define it, written from the paper in float64."""
    def grams(s, n):
        w = s.split()
        return Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    N = len(refs)
    score = {}
    for i in cands:
        total = 0.0
        for n in range(1, 5):
            df = Counter(g for k in refs for g in set().union(*(grams(r, n) for r in refs[k])))
            vec = lambda s: {g: c * math.log(N / max(1, df[g])) for g, c in grams(s, n).items()}  # noqa: E731
            c = vec(cands[i])
            acc = 0.0
            for r in refs[i]:
                rv = vec(r)
                num = sum(min(v, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, v in c.items())
                den = math.sqrt(sum(v * v for v in c.values())) * math.sqrt(sum(v * v for v in rv.values()))
                pen = math.exp(-(len(cands[i].split()) - len(r.split())) ** 2 / (2 * sigma ** 2))
                acc += pen * (num / den if den else 0.0)
            total += 10.0 * acc / len(refs[i])
        score[i] = total / 4
    return score


def test_cider_matches_the_papers_definition_on_random_captions():
    rng = random.Random(0)
    words = "a an the red blue cat dog man sits runs on in park street big small".split()
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))  # noqa: E731
    for trial in range(3):
        n_img = rng.randint(2, 9)
        refs = {k: [sent() for _ in range(rng.randint(1, 5))] for k in range(n_img)}
        cands = {k: (rng.choice(refs[k]) if rng.random() < 0.3 else sent()) for k in range(n_img)}
        got = cider_d(cands, refs, tokenizer="python")
        want = cider_d_reference(cands, refs)
        assert got["per_image"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert got["cider"] == pytest.approx(sum(want.values()) / n_img, rel=1e-9)


def test_cider_refuses_mismatched_ids():
    with pytest.raises(ValueError, match="different ids"):
        cider_d({1: "a"}, {2: ["a"]}, tokenizer="python")


CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs (a puppy) play in the park!",
            "A woman's bag isn't on the table, it's on the floor.",
            'A black-and-white photo of 3.5 cats; they\'re "cute"...', "The St. Louis arch at 5 p.m. -- beautiful",
            "people at the U.S. border?", "a cake with 1,000 candles: wow", "Kids' toys",
            "A giraffe eating leaves [from a tree]", "A bus that is parked on the side of a road\n"]


def test_python_tokenizer_examples():
    assert python_tokenize("A woman's bag isn't here.") == "a woman 's bag is n't here"
    assert python_tokenize("Two dogs (a puppy), 1,000 cats; 3.5 m.") == "two dogs -lrb- a puppy -rrb- 1,000 cats 3.5 m"


@pytest.mark.skipif(shutil.which("java") is None, reason="the Stanford PTB tokenizer needs java")
def test_python_tokenizer_agrees_with_stanford_ptb():
    ptb = tokenize_captions({i: [c] for i, c in enumerate(CAPTIONS)}, "ptb")
    assert [python_tokenize(c) for c in CAPTIONS] == [ptb[i][0] for i in range(len(CAPTIONS))]


def test_vqa_normalisation_rules():
    assert normalize_answer("A Dog.") == "dog"  # article, period, case
    assert normalize_answer("the two") == "2"  # number word
    assert normalize_answer("none") == "0"
    assert normalize_answer("dont know") == "don't know"  # contraction restored
    assert normalize_answer("yes!") == "yes"  # punctuation touching nothing -> space, then split
    assert normalize_answer("red, white") == "red white"  # punctuation next to a space: removed
    assert normalize_answer("1,000") == "1000"  # digit,digit comma removed
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_answer("  black\tand white\n") == "black and white"
    assert normalize_answer("left-hand") == "left hand"


def test_vqa_soft_accuracy_hand_computed():
    humans = ["2"] * 2 + ["3"] * 8
    # k humans said the prediction: each of those k sees k - 1 others, the 10 - k others see k;
    # min(., 3) / 3 averaged over the 10 leave-one-out subsets.
    assert vqa_accuracy("2", humans) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("3", humans) == pytest.approx(1.0)  # 8 >= 4: every subset has >= 3
    assert vqa_accuracy("4", humans) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("cat", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    # Normalisation on both sides: "Two." -> "2"; the humans' "two", "2 " and "the 2" -> "2", so
    # three humans agree with it: 0.9 as above (without normalisation only "2 " would match: 0.3).
    mixed = ["two", "2 ", "the 2", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two.", mixed) == pytest.approx(0.9)
    assert vqa_accuracy("A Dog", ["dog"] * 10) == pytest.approx(1.0)  # identical humans: prediction still normalised
    assert vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)
