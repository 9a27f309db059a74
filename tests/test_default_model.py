"""The bundled default model (cdlm/default_model.py): the shipped teacher + student, or a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

import cdlm.default_model as default_model_module


def test_default_is_the_shipped_teacher_and_student():
    teacher, student = default_model_module.default_model()
    assert (Path(teacher) / "model.safetensors").exists() or any(Path(teacher).glob("*.safetensors"))
    assert student is not None and (Path(student) / "adapter_config.json").exists()


def test_missing_assets_say_how_to_get_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model_module, "ASSETS", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="export-default"):
        default_model_module.default_model()
