"""The `blip3` entry of lmms-eval's model registry (`lmms_eval.models` entry points, pyproject.toml).

lmms-eval loads its entry points while it is itself being imported, so this module only names the
class (`eval.lmms_eval.Blip3`); that module, with torch and the model, is imported when a run
asks for `--model blip3`.
"""

from __future__ import annotations


def manifest():
    """lmms-eval's `ModelManifest` for `blip3`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="blip3", simple_class_path="blip3.eval.lmms_eval.Blip3")
