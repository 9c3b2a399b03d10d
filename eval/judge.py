"""VLMEvalKit's answer judge, run on a local causal language model (`--judge MODEL_DIR`).

When exact matching reads no option from an MMBench answer, VLMEvalKit asks an LLM (a GPT model
through an API by default) to map the answer to a letter, with its own prompt, and reads the
letter from the reply with the same matcher. Here the LLM is a local transformers model: nothing
is sent anywhere. Two differences, both because a local greedy model is deterministic: one
attempt instead of three, and no letter (the pass is wrong) where VLMEvalKit would pick one at
random after three failures.
"""

from __future__ import annotations

from pathlib import Path

from blip3.core.errors import UserError
from blip3.eval.vlmevalkit_matching import build_option_str, build_prompt, can_infer


class Judge:
    max_new_tokens = 16

    def __init__(self, path: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).is_dir():
            raise UserError("not a local model folder (a transformers causal LM)", field="--judge", file=path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load a causal LM here ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                            field="--judge", file=path) from None
        self.device, self.torch = device, torch
        self.calls = 0

    def prompt(self, question: str, options: dict[str, str], prediction: str) -> str:
        return build_prompt(question, build_option_str(options), prediction)

    def __call__(self, item, answer: str) -> str | None:
        """The option letter the judge reads from `answer` (or "Z": none fits), else None."""
        options = dict(item.target["options"])
        text = self.prompt(item.question, options, answer)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        self.calls += 1
        reply = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return can_infer(reply, options) or None
