"""Our DPO objective equals trl 1.16's on a text-only tiny Phi-3 (same pairs, same beta).

trl exposes no standalone loss: we build a real `DPOTrainer` (LoRA adapter, reference = the
adapter-disabled model, as in our loop), take one of its own collated batches and call its own
`compute_loss`; then compute `train.dpo` on the same tensors with the same model.
"""

from __future__ import annotations

import pytest
import torch

from blip3.train.dpo import dpo_loss, sequence_logps

WORDS = "a red green blue circle square triangle on background i see what is in the image ?".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _phi3(vocab: int):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )
    return Phi3ForCausalLM(cfg)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(tmp_path, beta):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer()
    pairs = Dataset.from_list([
        {"prompt": "what is in the image ?", "chosen": "i see a red circle", "rejected": "i see a blue square on green"},
        {"prompt": "what is in the image ?", "chosen": "a green triangle", "rejected": "a red square"},
        {"prompt": "i see", "chosen": "a blue circle on red background", "rejected": "a triangle"},
    ])
    model = _phi3(len(tok))
    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, per_device_train_batch_size=3, report_to=[], use_cpu=True,
        max_steps=1, logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok, peft_config=lora)
    policy = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter, so policy != reference and the loss is not log 2
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to("cpu") if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch).item()

        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        pol = sequence_logps(policy(**kwargs).logits, labels)
        with policy.disable_adapter():
            ref = sequence_logps(policy(**kwargs).logits, labels)
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    ours = dpo_loss(pc, pr, rc, rr, beta)
    assert abs(ours.loss.item() - trl_loss) < 1e-5, (ours.loss.item(), trl_loss)
    assert abs(trl_loss - 0.6931) > 1e-3  # the adapter really changed the policy


def test_dpo_loss_prefers_chosen():
    """Sign and reward bookkeeping: a policy that raised the chosen response has loss < log 2."""
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.5)
    assert out.loss.item() < torch.log(torch.tensor(2.0)).item()
    assert out.margin.item() == pytest.approx(0.5 * 2 - 0.5 * -2)


def test_sequence_logps_counts_only_labelled_tokens():
    logits = torch.zeros(1, 4, 5)  # uniform: each scored token has log p = -log 5
    labels = torch.tensor([[-100, -100, 2, 3]])
    assert sequence_logps(logits, labels).item() == pytest.approx(-2 * torch.log(torch.tensor(5.0)).item())
