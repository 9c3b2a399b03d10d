"""Evaluation protocols: every choice that moves a published number, named, with its source.

A benchmark's score depends on more than its metric: which in-context examples, how many beams,
how long an answer may be, how it is cut. Papers report numbers under one toolkit's choices, so
`blip3 eval --protocol NAME` runs all of them as that toolkit does (docs/evaluation.md lists each
preset's source, version and choices):

- `official` (default): each benchmark's own scorer (the VQA evaluation as fixed in 2021,
  pycocoevalcap, POPE's evaluate.py, VLMEvalKit for MMBench, whose authors' toolkit it is), greedy
  decoding and OpenFlamingo's prompt formats.
- `openflamingo`: the few-shot protocol of OpenFlamingo's `open_flamingo/eval`, under which the
  base model's 0/4/8-shot table is reported.
- `vlmevalkit`: VLMEvalKit's, under which instruct models are reported (its TSV benchmarks:
  MMBench with circular grouping, MMMU, AI2D, ScienceQA, SEED, ChartQA, DocVQA, OCRBench, MME; its
  prompts and answer extraction; an optional local LLM judge).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blip3.core.errors import UserError


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str
    #: tasks the protocol defines (None: all); others are refused before any work
    tasks: tuple[str, ...] | None = None
    #: tasks of the toolkit's own that are refused here, with the reason said in that refusal
    not_reproduced: dict[str, str] = field(default_factory=dict)
    seed: int = 0  # --seed default: draws of in-context examples (and OpenFlamingo's query set)
    num_beams: int = 1
    length_penalty: float = 1.0
    #: new tokens per task; "*" for the rest
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"coco": 20, "textcaps": 20, "nocaps": 20,
                                                                     "*": 10})
    #: in-context examples come from a fixed random subset of this many train items (None: all)
    query_set_size: int | None = None
    #: 0-shot still shows this many examples, their images removed (Flamingo's text-only shots)
    zero_shot_text_examples: int = 0
    demo_answer: str = "majority"  # "majority" or "first" human answer in a VQA example
    demo_separator: str = ""  # after each example's <|endofchunk|>
    vqa_cut_comma: bool = False  # answers end at the first ", "
    vqa_always_normalise: bool = False  # OpenFlamingo's port of vqaEval normalises both sides always
    textvqa_m4c: bool = True  # TextVQA by its own (m4c) evaluator; else as the other VQA tasks
    caption_drop_quotes: bool = False
    coco_split: str = "val2014"  # or "karpathy": the Karpathy test split (dataset_coco.json)

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens.get(task, self.max_new_tokens["*"])


OFFICIAL = Protocol(
    name="official",
    source="each benchmark's official scorer: GT-Vision-Lab/VQA vqaEval.py (commit a013f00, 2021), "
           "TextVQA's m4c evaluator (LLaVA commit c121f04), pycocoevalcap 1.2, POPE evaluate.py, "
           "VLMEvalKit 0.2rc1 (commit e8e78f0) for its TSV benchmarks",
)

OPENFLAMINGO = Protocol(
    name="openflamingo",
    source="mlfoundations/open_flamingo v2.0.1, open_flamingo/eval (commit 655f693)",
    tasks=("vqav2", "textvqa", "vizwiz", "coco"),
    not_reproduced={"okvqa": "OpenFlamingo stems OK-VQA answers with NLTK's trained POS tagger "
                             "(averaged_perceptron_tagger_eng), Punkt and WordNet: data nltk.download fetches from "
                             "NLTK's own site, which no package we found installs"},
    seed=42,
    num_beams=3,
    length_penalty=0.0,
    max_new_tokens={"coco": 20, "textvqa": 10, "*": 5},
    query_set_size=2048,
    zero_shot_text_examples=2,
    demo_answer="first",
    demo_separator="\n",
    vqa_cut_comma=True,
    vqa_always_normalise=True,
    textvqa_m4c=False,
    caption_drop_quotes=True,
    coco_split="karpathy",
)

VLMEVALKIT = Protocol(
    name="vlmevalkit",
    source="open-compass/VLMEvalKit 0.2rc1 (commit e8e78f0)",
    tasks=("mmbench", "ai2d", "scienceqa", "seedbench", "chartqa", "docvqa", "ocrbench", "mme",
           "mmmu", "pope"),
)

PROTOCOLS = {p.name: p for p in (OFFICIAL, OPENFLAMINGO, VLMEVALKIT)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}", field="--protocol")
    return PROTOCOLS[name]


def check_tasks(protocol: Protocol, tasks: list[str]) -> None:
    """One line before anything runs when a task is outside the protocol."""
    if protocol.tasks is None:
        return
    other = [t for t in tasks if t not in protocol.tasks]
    for name in other:
        if name in protocol.not_reproduced:
            raise UserError(f"{name} is not reproduced under --protocol {protocol.name}: "
                            f"{protocol.not_reproduced[name]}; run it under --protocol official", field="--protocol")
    if other:
        raise UserError(f"the {protocol.name} protocol defines {', '.join(protocol.tasks)}, not {', '.join(other)}; "
                        "run those under another --protocol (official covers every task)", field="--protocol")
