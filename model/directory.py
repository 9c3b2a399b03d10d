"""A model directory on disk: what `blip3 model init`, each training stage (`final/`) and
`blip3 eval` read and write. Loading one is the model's business, so training and evaluation both
come here rather than to each other.

Layout: config.json + model.safetensors (`XGenMM.save_pretrained`), the processor's files
(`XGenMMProcessor.save_pretrained`), and optionally `adapter/`, an unmerged LoRA adapter in peft's
format, merged into the weights when the directory is loaded. A stage output folder stands for
its `final/` model.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_DIR = "adapter"


def model_dir(path: str | Path) -> Path:
    """A model dir, or a stage output dir whose `final/` is the model."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    return p


def load_model_dir(path: str | Path):
    """(XGenMM, processor) from a saved dir; an unmerged LoRA adapter in it is merged on load."""
    from .processor import XGenMMProcessor
    from .xgenmm import XGenMM

    d = model_dir(path)
    model = XGenMM.from_pretrained(d)
    processor = XGenMMProcessor.from_pretrained(d, model.config)
    if (d / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(d / ADAPTER_DIR)).merge_and_unload()
    return model, processor
