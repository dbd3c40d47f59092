"""VQAv2 accuracy: the official answer normalisation and the soft, leave-one-out accuracy.

Normalisation (the VQA challenge's rules): newlines/tabs to spaces, surrounding spaces stripped;
punctuation removed or turned into a space (removed when it touches a space or when the text holds
a digit,digit comma, so "1,000" -> "1000"; a period is removed unless a digit follows it), then
lower case, number words to digits ("two" -> "2", "none" -> "0"), articles (a, an, the) dropped
and apostrophe-less contractions restored ("dont" -> "don't").

Accuracy of a predicted answer against the 10 human answers: for each human i, the prediction
scores min(#other humans who gave it / 3, 1); the question's accuracy is the mean over the 10
(the official script's average over the 10 choose 9 subsets). The prediction is always normalised
with these rules (the evaluation server normalises every submitted answer; the script alone does
only when the humans disagree); the human answers are normalised only when they are not all
identical, as the script does (VQAv2's annotations are normalised already); case is ignored.

Test: tests/test_evaluate_metrics.py (hand-computed fixtures).
"""
from __future__ import annotations

import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!"]
# Written without apostrophe -> restored (the official table, keys as it spells them, quirks kept).
_CONTRACTIONS = """aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't
couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't
hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've
he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've
isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've"""
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTIONS.split())

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern (its look-behind is a no-op)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    out = text
    drop = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if drop or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full normalisation of one answer."""
    return digits_and_articles(strip_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Soft accuracy in [0, 1] of one prediction against the human answers (10 in VQAv2)."""
    if not human_answers:
        raise ValueError("vqa_accuracy: no human answers")
    humans = [_clean(a) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
    pred = normalize_answer(prediction).lower()
    same = [h.lower() == pred for h in humans]
    total = sum(same)
    return sum(min(1.0, (total - s) / 3.0) for s in same) / len(humans)
