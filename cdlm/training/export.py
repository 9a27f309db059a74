"""Stage `export-default`: ship a world's teacher and student as the package's bundled model.

cdlm/assets/default/teacher/  the LLaDA-layout teacher checkpoint (config.json, safetensors,
                              tokenizer files): the base model
cdlm/assets/default/student/  the CDLM LoRA adapter (adapter_config.json,
                              adapter_model.safetensors) and generation_config.json (the
                              threshold of the eval table): `LLM()` serves base + adapter
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cdlm.training.io_utils import replace_dir, tmp_dir_next_to

ASSETS = Path(__file__).resolve().parent.parent / "cdlm" / "assets" / "default"
TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")
STUDENT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_default(teacher_dir: Path, adapter_dir: Path, assets: Path = ASSETS,
                   table: Path | None = None) -> Path:
    """Copy the two directories in (each swapped in atomically); returns the assets dir.

    The eval table's threshold is written to the student's `generation_config.json`, so that
    `LLM()` and `cdlm serve` decode at the operating point the table reports."""
    threshold = None
    if table is not None and table.exists():
        threshold = json.loads(table.read_text())["config"]["threshold"]
    for src, name, files in ((teacher_dir, "teacher", TEACHER_FILES),
                             (adapter_dir, "student", STUDENT_FILES)):
        tmp = tmp_dir_next_to(assets / name)
        for f in files:
            shutil.copy(src / f, tmp / f)
        if name == "student" and threshold is not None:
            # The operating point the table was measured at becomes the served default.
            (tmp / "generation_config.json").write_text(
                json.dumps({"threshold": threshold}, indent=2) + "\n")
        if name == "student":
            # The adapter names its base by a path on the training machine; point it at the
            # bundled teacher instead (relative, so the package can live anywhere).
            cfg = json.loads((tmp / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = "../teacher"
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        # mkdtemp makes 0700 directories: the package's files must be world-readable.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_dir(tmp, assets / name)
    if table is not None and table.exists():
        shutil.copy(table, assets / "table.json")
        (assets / "table.json").chmod(0o644)
    return assets
