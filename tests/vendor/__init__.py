"""Official scorers, vendored unchanged with their licences, run by the parity tests.

- `vqa/vqaEval.py`: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at commit
  a013f00 (2021, "Fixed processing answers bug"), BSD licence in `vqa/LICENSE`. It is Python 2;
  `load_vqa_eval` converts it with the standard library's 2to3 when a test loads it.
- `open_flamingo/vqa_metric.py` and `open_flamingo/utils.py`: mlfoundations/open_flamingo,
  open_flamingo/eval/ at commit 655f693 (v2.0.1), MIT licence in `open_flamingo/LICENSE`.
- `vlmevalkit/multiple_choice.py`, `vqa_eval.py`, `ocrbench.py`, `mme.py`: VLMEvalKit's
  scoring code, with shims for its imports and result-file helpers (said in each file).
- `llava/m4c_evaluator.py`: haotian-liu/LLaVA, llava/eval/m4c_evaluator.py at commit c121f04
  (from facebookresearch/mmf), Apache-2.0 licence in `llava/LICENSE`.
- `pope/evaluate.py`: AoiDragon/POPE, evaluate.py at commit 08d957b, MIT licence in
  `pope/LICENSE`. It reads the two paths set in its first lines; `run_pope_evaluate` sets them.
- `vlmevalkit/matching_util.py`: open-compass/VLMEvalKit, vlmeval/utils/matching_util.py at commit
  e8e78f0, Apache-2.0 licence in `vlmevalkit/LICENSE` (its logger import is the one line changed,
  marked in the file). The runtime copy of its matcher is eval/vlmevalkit_matching.py.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

HERE = Path(__file__).parent


def load_module(path: Path, name: str, source: str | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source if source is not None else path.read_text(), str(path), "exec"), module.__dict__)
    sys.modules.setdefault(name, module)
    return module


def load_vqa_eval() -> types.ModuleType:
    """The official (Python 2) vqaEval.py, converted by lib2to3's print fixer only."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, PendingDeprecationWarning))
        from lib2to3.refactor import RefactoringTool

        tool = RefactoringTool(["lib2to3.fixes.fix_print"])
        path = HERE / "vqa" / "vqaEval.py"
        source = str(tool.refactor_string(path.read_text() + "\n", str(path)))
    return load_module(path, "vendored_vqa_eval", source)


def load_open_flamingo_vqa() -> types.ModuleType:
    return load_module(HERE / "open_flamingo" / "vqa_metric.py", "vendored_open_flamingo_vqa")


def load_open_flamingo_utils() -> types.ModuleType:
    return load_module(HERE / "open_flamingo" / "utils.py", "vendored_open_flamingo_utils")


def run_pope_evaluate(answers_path: Path, labels_path: Path) -> dict[str, float]:
    """POPE's evaluate.py on two JSON-lines files; its printed metrics, by name."""
    import contextlib
    import io

    source = (HERE / "pope" / "evaluate.py").read_text()
    source = source.replace("ans_file = ''", f"ans_file = {str(answers_path)!r}", 1)
    source = source.replace("label_file = ''", f"label_file = {str(labels_path)!r}", 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, str(HERE / "pope" / "evaluate.py"), "exec"), {"__name__": "pope_evaluate"})
    values = {}
    for line in out.getvalue().splitlines():
        if ": " in line:
            name, value = line.split(": ", 1)
            values[name] = float(value)
    return values
