"""megl.methods: the one registry of training methods (objective, model builder, setup, kind)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megl import methods
from megl.config import Config, ConfigError
from megl.methods import Method, get_method, list_methods, register_method


def test_every_method_is_registered_with_its_kind():
    assert list_methods() == sorted(["baseline", "megl", "gradia", "haics", "res-g", "res-l", "rrr", "cdep", "llava",
                                     "ft-cot"])
    assert list_methods(kind="llm") == ["ft-cot", "llava"]
    assert get_method("megl").resolve("build_model").__module__ == "megl.models.megl"
    assert get_method("llava").resolve("build_model").__name__ == "build_llm_classifier"
    assert get_method("megl").resolve("setup") is None


def test_unknown_names_and_duplicates_are_refused():
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of baseline, cdep"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_method(Method("megl", "megl.losses.megl:megl_loss", "megl.models.megl:build_model"))
    with pytest.raises(ValueError, match="kind must be one of"):
        Method("x", "a:b", "c:d", kind="audio")
    with pytest.raises(ConfigError, match="unknown method 'nope'.*--method NAME"):
        Config(method="nope").validate()


def test_a_registered_method_of_ones_own_is_called_and_validated(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    calls = []
    m = register_method(Method("mine", lambda *a: calls.append(a) or {"total": 0}, "megl.models.megl:build_model"))
    assert get_method("mine") is m and "mine" in list_methods(kind="visual")
    assert get_method("mine")("model", "batch") == {"total": 0} and calls == [("model", "batch", None, None)]
    assert Config(method="mine").validate().method == "mine"


def test_the_registry_imports_no_model_code():
    code = "import sys, megl.methods as m; m.get_method('llava'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
