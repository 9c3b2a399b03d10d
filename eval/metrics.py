"""Benchmark metrics, each following its reference implementation so numbers compare with papers.

- VQA accuracy: the official VQAv2 evaluation as it stands since 2021 (also used for OK-VQA):
  answer normalisation when the humans disagree, then min(#matches / 3, 1) averaged over the ten
  leave-one-annotator-out subsets; OpenFlamingo's variant too. TextVQA: its own m4c evaluator.
- POPE: the yes/no parsing of the POPE / LLaVA evaluation, then accuracy, precision, recall, F1
  and the share of "yes" answers (a model that always says yes scores 0.5 accuracy, ratio 1.0).
- Multiple choice: MMBench circular evaluation, where a question counts only if every pass
  (rotation of its options) is answered right; answers are read by VLMEvalKit's matcher
  (eval/vlmevalkit_matching.py).
- Captioning: pycocoevalcap 1.2 end to end (PTB tokenizer, BLEU-4, CIDEr, METEOR); it needs Java.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

# --- VQA ------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Both patterns are the official script's, quirks included: `(?!<=\d)` is a lookahead, not a
# lookbehind, so "1.5" keeps its period only because of the `(?!\d)` after it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


#: The official script passes `re.UNICODE` (32) as `re.sub`'s third positional argument, which is
#: `count`: at most 32 periods are stripped. Kept, so scores equal the script's.
_PERIOD_STRIP_COUNT = 32
#: A question with more human answers than this is a failed row, not scored: VQA benchmarks have
#: ten (VizWiz and TextVQA too), and a list of thousands is a broken file.
MAX_VQA_ANSWERS = 100


def _process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQA evaluation normalises it ("Two dogs." -> "2 dogs")."""
    return _process_digit_article(_process_punctuation(_strip(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, always_normalise: bool = False,
                 confidences: Sequence[str] | None = None) -> float:
    """One question's accuracy against its (usually ten) human answers.

    The rule of the official VQA evaluation as it stands since its 2021 fix (GT-Vision-Lab/VQA,
    `vqaEval.py`, commit a013f00): every answer is stripped; only when the humans disagree are the
    prediction and the human answers normalised (punctuation, number words, articles,
    contractions). So `Two` against ten `2` scores 0, and `2` against {two: 3, three: 7} scores
    0.9. `always_normalise` is OpenFlamingo's port of the script, which normalises both always.

    Each leave-one-annotator-out subset scores min(#matches / 3, 1), and the result is their mean
    (1, 2, 3 or 4+ matching humans of ten: 0.3, 0.6, 0.9, 1.0). Counted once, not per subset, so
    the cost is linear in the number of answers.

    The scripts leave out every answer record equal to the annotator's (`item != gtAnsDatum`).
    VQAv2's records differ by `answer_id`, so that is one annotator; VizWiz's (as OpenFlamingo
    ships them) have only answer and `answer_confidence`, so every annotator with the same
    answer and confidence is left out with them. `confidences` selects that rule.
    """
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred, gts = _strip(prediction), [_strip(a) for a in answers]
    if always_normalise or len(set(gts)) > 1:
        pred, gts = normalize_vqa_answer(pred), [normalize_vqa_answer(a) for a in gts]
    n, hits = len(gts), sum(1 for a in gts if a == pred)
    if confidences is None:
        # an annotator who gave `pred` leaves hits - 1 matching others; any other annotator leaves hits
        return (hits * min(1.0, (hits - 1) / 3) + (n - hits) * min(1.0, hits / 3)) / n
    if len(confidences) != n:
        raise ValueError("one confidence per answer")
    records = Counter(zip(gts, confidences))
    return sum(min(1.0, (hits - (records[(a, c)] if a == pred else 0)) / 3) for a, c in zip(gts, confidences)) / n


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's own accuracy (its challenge's m4c evaluator, as LLaVA runs it): prediction and
    every human answer normalised by EvalAI's answer processor, always; then the same
    leave-one-annotator-out mean of min(#matches / 3, 1), counted once."""
    from blip3.eval.m4c_evaluator import EvalAIAnswerProcessor

    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    process = EvalAIAnswerProcessor()
    pred, gts = process(prediction), [process(a) for a in answers]
    n, hits = len(gts), sum(1 for a in gts if a == pred)
    return (hits * min(1.0, (hits - 1) / 3) + (n - hits) * min(1.0, hits / 3)) / n


# --- POPE -------------------------------------------------------------------------------------
def parse_yes_no(text: str) -> str:
    """The POPE evaluation's parsing: first sentence, commas dropped; any "no"/"No"/"not" -> no."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of raw model answers."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("POPE needs one prediction per label, and at least one")
    pred = [parse_yes_no(p) for p in predictions]
    gold = [label.strip().lower() for label in labels]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": pred.count("yes") / len(pred)}


# --- multiple choice --------------------------------------------------------------------------
def circular_accuracy(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """(question id, rotation right?) pairs -> MMBench circular accuracy (a question counts only
    if all its rotations are right) and the plain accuracy of all rotations."""
    by_question: dict[str, list[bool]] = defaultdict(list)
    for qid, ok in results:
        by_question[qid].append(bool(ok))
    if not by_question:
        raise ValueError("no multiple-choice results")
    flat = [ok for oks in by_question.values() for ok in oks]
    return {"circular_accuracy": sum(all(o) for o in by_question.values()) / len(by_question),
            "accuracy": sum(flat) / len(flat)}


# --- captioning -------------------------------------------------------------------------------
JAVA_PACKAGE = "default-jre-headless"


def java_available() -> bool:
    return shutil.which("java") is not None


def require_java(what: str) -> None:
    """One line, before any generation, when pycocoevalcap's Java programs cannot run."""
    if not java_available():
        from blip3.core.errors import UserError

        raise UserError(f"{what} is scored with pycocoevalcap, whose PTB tokenizer and METEOR are Java programs, "
                        f"and no `java` is on PATH; install a Java runtime (Debian/Ubuntu: apt-get install "
                        f"{JAVA_PACKAGE})", field="TASK")


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   *, meteor: bool | None = None) -> dict[str, float]:
    """Corpus BLEU-4, CIDEr and METEOR from pycocoevalcap 1.2 itself, as the COCO caption
    evaluation runs them: its PTBTokenizer (Stanford's Java tokenizer), then its scorers.

    `meteor=False` skips METEOR (its Java process takes seconds to start). CIDEr's document
    frequencies come from the references given, so score the whole split at once.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(predictions) or not predictions:
        raise ValueError("captioning needs one prediction for every image with references")
    require_java("captioning")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": str(r)} for r in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": str(predictions[k])}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {"BLEU-4": float(bleu[3]), "CIDEr": float(cider)}
    if meteor is None or meteor:
        scores["METEOR"] = _meteor(gts, res)
    return scores


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    return float(score)
