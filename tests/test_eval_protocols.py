"""Protocol presets: OpenFlamingo's few-shot protocol (checked against its own code where it has
code: the query set draw), VLMEvalKit's, and the refusals that keep them apart."""

from __future__ import annotations

import json
import shutil

import pytest

from blip3.core.errors import UserError
from blip3.eval.protocols import OPENFLAMINGO, PROTOCOLS, check_tasks, get_protocol
from blip3.eval.runner import plan_task
from blip3.eval.tasks import Item, draw_shots, get_task, query_set
from tests.eval_fixtures import benchmarks, tiny_model_dir  # noqa: F401  (fixtures)
from tests.model_fixtures import tiny_config, tiny_processor  # noqa: F401  (fixtures)
from tests.vendor import load_open_flamingo_utils


def test_query_set_is_open_flamingos_draw(monkeypatch):
    """numpy seeded 42: the test order draw (prepare_eval_samples), then 2,048 train items without
    replacement (get_query_set), run in OpenFlamingo's own utils.py."""
    import numpy as np
    import torch.utils.data

    of = load_open_flamingo_utils()
    # the DataLoader's distributed sampler needs a process group; the draw is before it
    monkeypatch.setattr(torch.utils.data.distributed, "DistributedSampler", lambda dataset: None)
    train = [Item(f"t{i}", lambda: None) for i in range(5000)]
    n_test = 1234
    np.random.seed(42)
    of.prepare_eval_samples(list(range(n_test)), n_test, 8)
    official = of.get_query_set(train, 2048)
    ours = query_set(train, 2048, 42, n_test)
    assert [t.id for t in ours] == [t.id for t in official] and len(ours) == 2048
    assert [t.id for t in query_set(train, 2048, 42, 0)] != [t.id for t in ours]  # the test draw comes first
    assert query_set(train[:10], 2048, 42, n_test) == train[:10]


def test_openflamingo_vqa_prompts_answers_and_scoring(benchmarks):
    task = get_task("vqav2", OPENFLAMINGO)
    items, train = task.load(benchmarks, "test"), task.load(benchmarks, "train")
    shots = draw_shots(train, items[0], 2, seed=42)
    p = task.prompt(items[0], shots)
    # the first human answer ("2"), and "\n" after each example's <|endofchunk|>
    assert p.text == ("".join(f"<image>Question:{s.question} Short answer:2<|endofchunk|>\n" for s in shots)
                      + "<image>Question:How many dogs are there 0? Short answer:")
    assert len(p.images) == 3
    # 0-shot: two examples, text only
    zero = task.prompt(items[0], shots, text_only_shots=True)
    assert zero.text.count("<image>") == 1 and len(zero.images) == 1 and zero.text.count("Short answer:2") == 2
    assert task.answer("red, blue Question: x") == "red" and get_task("vqav2").answer("red, blue") == "red, blue"
    # OpenFlamingo's vqa_metric normalises always: "Two" matches ten "2"s there, not officially
    one = Item("q", lambda: None, "q", {"answers": ["2"] * 10})
    assert task.score_item(one, "Two") == 1.0 and get_task("vqav2").score_item(one, "Two") == 0.0
    assert OPENFLAMINGO.num_beams == 3 and OPENFLAMINGO.new_tokens("vqav2") == 5 and OPENFLAMINGO.new_tokens("coco") == 20
    assert OPENFLAMINGO.new_tokens("textvqa") == 10


def _karpathy(root, benchmarks):
    """COCO with the Karpathy split file: two test images with val2014 captions, one train image."""
    coco = shutil.copytree(benchmarks / "coco", root / "coco")
    val = json.loads((coco / "annotations" / "captions_val2014.json").read_text())
    images = [{"split": "test", "filepath": "val2014", "filename": im["file_name"], "cocoid": im["id"],
               "sentences": [{"raw": "unused"}]} for im in val["images"][:2]]
    images.append({"split": "restval", "filepath": "val2014", "filename": val["images"][2]["file_name"],
                   "cocoid": val["images"][2]["id"], "sentences": [{"raw": "not used"}]})
    images += [{"split": "train", "filepath": "val2014", "filename": val["images"][k]["file_name"], "cocoid": 900 + k,
                "sentences": [{"raw": f'A "quoted" caption {k}.'}, {"raw": "second"}]} for k in range(3)]
    (coco / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_openflamingo_coco_is_the_karpathy_test_split(benchmarks, tmp_path):
    root = _karpathy(tmp_path, benchmarks)
    task = get_task("coco", OPENFLAMINGO)
    items, train = task.load(root, "test"), task.load(root, "train")
    assert [it.id for it in items] == ["200", "201"]  # test split only; restval is not test
    assert items[0].target["references"] == ["A dog runs on the grass.", "A brown dog running outside."]
    assert [t.target["references"] for t in train] == [[f'A "quoted" caption {k}.'] for k in range(3)]
    p = task.prompt(items[0], train[:2])
    assert p.text == ('<image>Output:A "quoted" caption 0.<|endofchunk|>\n<image>Output:A "quoted" caption 1.'
                      "<|endofchunk|>\n<image>Output:")
    assert task.answer('A "big" dog Output: x') == "A big dog"
    assert len(get_task("coco").load(root, "test")) == 3  # the official protocol: all of captions_val2014


def test_protocol_refusals_are_one_line(benchmarks):
    with pytest.raises(UserError, match="openflamingo protocol defines .* not pope"):
        check_tasks(OPENFLAMINGO, ["vqav2", "pope"])
    with pytest.raises(UserError, match="okvqa is not reproduced under --protocol openflamingo: .*POS tagger"):
        check_tasks(OPENFLAMINGO, ["vqav2", "okvqa"])
    with pytest.raises(UserError, match="vlmevalkit protocol defines"):
        check_tasks(get_protocol("vlmevalkit"), ["coco"])
    with pytest.raises(UserError, match="unknown protocol 'lmms'"):
        get_protocol("lmms")
    assert set(PROTOCOLS) == {"official", "openflamingo", "vlmevalkit"}
    # 0-shot under openflamingo still needs its two text-only examples from the train split
    plan = plan_task("vqav2", OPENFLAMINGO, benchmarks, 0, 1, 42)
    assert len(plan.pool) == 8 and len(plan.items) == 1


def test_openflamingo_run_end_to_end(tiny_model_dir, benchmarks, tmp_path):
    """Beam search (3 beams), two text-only examples at 0-shot, recorded as `vqav2@openflamingo`
    beside (not over) the official protocol's row."""
    import duckdb

    from blip3.eval.runner import evaluate

    db, out = tmp_path / "c.duckdb", tmp_path / "preds"
    (res,) = evaluate(tiny_model_dir, ["vqav2"], data=benchmarks, out=out, limit=2, db=db, protocol="openflamingo")
    rows = [json.loads(x) for x in (out / "vqav2-0shot.openflamingo.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt"].count("<image>") == 1 for r in rows)
    assert all(r["prompt"].count("Short answer:2<|endofchunk|>\n") == 2 for r in rows)
    assert all(", " not in r["answer"] for r in rows)
    evaluate(tiny_model_dir, ["vqav2"], data=benchmarks, out=out, limit=2, db=db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT DISTINCT task FROM evals ORDER BY task").fetchall() == [("vqav2",),
                                                                                         ("vqav2@openflamingo",)]


def _judge_dir(path, letter: str):
    """A tiny GPT-2 whose every next token is `letter`: its final LayerNorm outputs a constant
    vector, and only `letter`'s (tied) embedding points along it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from blip3.model.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(512)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=2048, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[tok.convert_tokens_to_ids(letter), 0] = 50.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_vlmevalkit_judge_reads_only_what_exact_matching_cannot(benchmarks, tmp_path):
    from blip3.eval.judge import Judge
    from blip3.eval.protocols import VLMEVALKIT

    judge = Judge(_judge_dir(tmp_path / "judge", "B"))
    judge.max_new_tokens = 1
    task = get_task("mmbench", VLMEVALKIT)
    task.judge = judge
    item = task.load(benchmarks, "test")[0]  # answer B (dog)
    assert task.choice(item, "Answer: A") == "A" and judge.calls == 0  # exact matching read it
    assert task.choice(item, "a furry animal that barks") == "B" and judge.calls == 1
    assert judge.prompt(item.question, item.target["options"], "x").endswith(
        "Question: What animal is shown??\nOptions: There are several options: \nA. cat\nB. dog\nC. bird\nD. fish\n\n"
        "Answer: x\nYour output: ")
    assert get_task("mmbench").choice(item, "a furry animal that barks") is None  # no judge: no choice
    with pytest.raises(UserError, match="not a local model folder"):
        Judge(tmp_path / "nothing")
