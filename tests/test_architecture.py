"""The rules the code keeps (docs/architecture.md), checked by walking refine_llm's AST
(refine_llm.devtools.imports): no import cycle, even through imports inside functions; no module takes a
private name (``_x``) from another; no module over 600 lines; the layer rules and where the heavy optional
libraries may be imported. Each rule is also shown to catch a made-up package that breaks it."""

from __future__ import annotations

from refine_llm.devtools import imports as I


def _package(tmp_path, files: dict[str, str]):
    root = tmp_path / "refine_llm"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "__init__.py").touch()
    return root


def test_no_import_cycles_even_through_function_local_imports(tmp_path):
    assert I.cycles(I.graph(I.edges())) == []
    # the checker sees a cycle closed inside a function body
    root = _package(tmp_path, {"a.py": "from refine_llm import b\n",
                               "b.py": "def f():\n    from refine_llm.a import x\n    return x\n"})
    es = I.edges(root)
    assert I.cycles(I.graph(es)) == [["refine_llm.a", "refine_llm.b"]]
    assert any(e.local for e in es)


def test_no_module_imports_a_private_name_of_another(tmp_path):
    assert [f"{e.src}:{e.line} {e.names}" for e in I.private_imports(I.edges())] == []
    root = _package(tmp_path, {"a.py": "_y = 1\n", "b.py": "from refine_llm.a import _y\n",
                               "c.py": "from refine_llm import a\n\ndef f():\n    return a._y\n"})
    found = sorted(e.src for e in I.private_imports(I.edges(root)))
    assert found == ["refine_llm.b", "refine_llm.c"]


def test_no_module_is_over_600_lines(tmp_path):
    assert I.long_modules() == {}
    root = _package(tmp_path, {"long.py": "x = 1\n" * (I.MAX_LINES + 1)})
    assert I.long_modules(root) == {"refine_llm.long": I.MAX_LINES + 1}


def test_layer_rules_and_optional_libraries(tmp_path):
    assert I.layer_violations(I.edges()) == []
    assert I.optional_violations() == []
    root = _package(tmp_path, {"metrics/__init__.py": "def f():\n    from refine_llm import models\n",
                               "models.py": "", "serving/__init__.py": "from refine_llm import bandit\n",
                               "bandit.py": "import ray\n"})
    bad = I.layer_violations(I.edges(root))
    assert len(bad) == 2 and any("metrics" in b and "models" in b for b in bad), bad
    assert [v.split(":")[0] for v in I.optional_violations(root)] == ["bandit"]


def test_the_command_prints_no_cycles(capsys):
    assert I.main([]) == 0
    out = capsys.readouterr().out
    assert "import cycles: 0" in out and "private names imported from another module: 0" in out
