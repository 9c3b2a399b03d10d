"""The `blip3` model of lmms-eval: its own evaluator runs any of its image tasks on a model directory.

lmms-eval finds models through the `lmms_eval.models` entry-point group (`eval.lmms_plugin`), so
`lmms-eval --model blip3 --model_args pretrained=DIR --tasks ...` (or
`lmms_eval.evaluator.simple_evaluate(model="blip3", ...)`) loads this class. The model is
loaded and asked exactly as `blip3 eval` does it (`eval.runner.Generator`: the model directory,
its processor, the NaN/inf weight check, batched left-padded generation); lmms-eval builds the
prompts, decides the decoding settings and scores the answers. Task kinds: generate_until,
multiple_choice and loglikelihood (scored by the model's loss on each continuation).

model_args: `pretrained` (a model directory, or a stage output folder whose `final/` is used),
`device` (default cpu), `batch_size` (default 1), `chat` (default true: the prompt is a user turn
of the chat template, for instruct models; false: raw text, for the base model),
`max_new_tokens` (when the task gives none, default 256).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from blip3.core.errors import UserError
from blip3.eval.runner import Generator
from blip3.eval.tasks import Prompt
from blip3.model.config import IGNORE_INDEX, IMAGE_TOKEN

#: Decoding settings lmms-eval tasks give that change nothing here (greedy is what they ask for
#: when they set temperature 0; `until` is applied to the text).
_NEUTRAL = {"temperature": 0, "do_sample": False, "top_p": None, "top_k": None}


def _filelock_patch_fits() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` first patches filelock's lock metaclass through
    `filelock._api` (for filelock 3.16+), a module filelock 4, this tree's, no longer has: the
    import fails before any task is read. With filelock 4 that patch is marked done (its own
    `_patched` flag) so the evaluator runs on; with filelock 3 it runs as lmms-eval wrote it. This
    module is imported when `--model blip3` is resolved, which `simple_evaluate` does first."""
    try:
        import filelock._api  # noqa: F401
    except ModuleNotFoundError:
        from lmms_eval import evaluator

        evaluator._enable_reentrant_filelocks._patched = True


_filelock_patch_fits()


def _flag(value: Any) -> bool:
    """A model_args boolean: lmms-eval passes them as the strings of the command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise UserError(f"expected true or false, got {value!r}", field="chat")


class Blip3(lmms):
    """lmms-eval's simple-model interface on a blip3 model directory."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1, chat: Any = True,
                 max_new_tokens: int | str = 256, max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise UserError(f"unknown model_args {', '.join(sorted(kwargs))} (blip3 takes pretrained, device, "
                            "batch_size, chat, max_new_tokens)", field="--model_args")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"a batch size is a whole number, got {batch_size!r}", field="batch_size") from None
        self.chat = _flag(chat)
        self.max_new_tokens = int(max_new_tokens)
        self.generator = Generator(Path(pretrained), device or "cpu")

    # --- generation ----------------------------------------------------------------------------
    def _prompt(self, context: str, visuals: list, task: str) -> Prompt:
        """The context with its images: `<image>` markers in the context place them when there is
        one per image; otherwise every marker is made plain text and the images go first."""
        images = []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise UserError(f"task {task} gives a {type(v).__name__} visual; blip3 reads images only",
                                field="--tasks")
            images.append(v.convert("RGB"))
        proc = self.generator.proc
        text = proc.plain(context, keep=(IMAGE_TOKEN,))
        if text.count(IMAGE_TOKEN) != len(images):
            text = IMAGE_TOKEN * len(images) + ("\n" if images else "") + proc.plain(text)
        return Prompt(text, images, chat=self.chat)

    def _settings(self, gen_kwargs: dict, task: str) -> tuple[list[str], int, int]:
        """(stop strings, max new tokens, beams) from a task's generation_kwargs. Sampling is
        refused in one line rather than silently decoded greedily."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_new_tokens", None) or self.max_new_tokens)
        beams = int(kw.pop("num_beams", None) or 1)
        sampling = kw.pop("do_sample", False) or float(kw.get("temperature") or 0) > 0
        if sampling:
            raise UserError(f"task {task} asks for sampling (temperature {kw.get('temperature')}); blip3 decodes "
                            "greedily or with beams: pass --gen_kwargs temperature=0", field="--gen_kwargs")
        for key in _NEUTRAL:
            kw.pop(key, None)
        kw.pop("image_aspect_ratio", None)  # a LLaVA preprocessing switch; our processor has its own
        if kw:
            raise UserError(f"task {task} sets generation_kwargs blip3 does not apply: {', '.join(sorted(kw))}",
                            field="--gen_kwargs")
        return until, max_new, beams

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in request order. Requests are batched by decoding settings;
        each answer is cut before the first of its task's stop strings."""
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            until, max_new, beams = self._settings(gen_kwargs, task)
            jobs.append((i, self._prompt(context, list(visuals or []), task), until, (max_new, beams)))
        answers: list[str | None] = [None] * len(requests)
        for key in dict.fromkeys(job[3] for job in jobs):
            group = [job for job in jobs if job[3] == key]
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                texts = self.generator([job[1] for job in batch], key[0], key[1], length_penalty=1.0)
                for (i, _, until, _), text in zip(batch, texts):
                    answers[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens given the context and images,
        whether greedy decoding would write them) per request: lmms-eval's multiple_choice and
        loglikelihood tasks. The first value is a loss, not a log-probability: lmms-eval's
        multiple_choice scoring picks the choice of least value (`argmin`), and its own models
        return their mean loss there. Base text: the continuation is what follows the context's
        tokens in the tokens of context + continuation (lm-eval's split). Chat: the continuation,
        stripped, is the assistant turn, its `<|end|>` not scored."""
        encoded = []
        for req in requests:
            if len(req.args) == 2:  # the unconditional half of a mutual-information task: no doc
                context, target, visuals, task = *req.args, [], "?"
            else:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                visuals = list(doc_to_visual(doc) or []) if doc_to_visual is not None else []
                target = target if isinstance(target, str) else target(doc)
            encoded.append(self._scored(self._prompt(context, visuals, task), str(target)))
        results: list[tuple[float, bool]] = []
        for start in range(0, len(encoded), self.batch_size):
            results += self._score(encoded[start:start + self.batch_size])
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args[:2], res)
        # lmms-eval 0.7.3 passes every model output through `unwrap_generation_output`, which turns
        # a (float, bool) pair into its string and breaks every multiple_choice task; only a
        # GenerationResult's `text` reaches the task as it is, so the pairs travel in one.
        return [GenerationResult(text=res) for res in results]  # type: ignore[arg-type,misc]

    def _scored(self, prompt: Prompt, continuation: str):
        """The prompt + continuation, encoded with labels on the continuation's tokens only."""
        proc = self.generator.proc
        if prompt.chat:
            enc = proc.encode_chat([{"role": "user", "content": prompt.text},
                                    {"role": "assistant", "content": continuation.strip()}], prompt.images)
            last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)  # its <|end|>
            enc.labels[last] = IGNORE_INDEX
            return enc
        n_context = len(proc.encode_prompt(prompt.text, prompt.images))
        enc = proc.encode_prompt(prompt.text + proc.plain(continuation), prompt.images)
        enc.labels = [IGNORE_INDEX] * n_context + enc.input_ids[n_context:]
        return enc

    def _score(self, encoded: list) -> list[tuple[float, bool]]:
        gen = self.generator
        torch = gen.torch
        batch = {k: v.to(gen.device) for k, v in gen.proc.collate(encoded).items()}
        labels = batch.pop("labels")
        with torch.inference_mode():
            logits = gen.model(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                               image_sizes=batch.get("image_sizes")).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        scored = target != IGNORE_INDEX
        token_logp = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        greedy = (logp.argmax(-1) == target) | ~scored
        n = scored.sum(-1).clamp(min=1)
        nll = -(token_logp * scored).sum(-1) / n
        return [(float(nll[r]), bool(greedy[r].all())) for r in range(len(encoded))]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("blip3 answers generate_until, multiple_choice and loglikelihood tasks; "
                                  "this task is a multi-round one")


def _cut(text: str, until: list[str]) -> str:
    """`text` before the earliest stop string."""
    end = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:end]
