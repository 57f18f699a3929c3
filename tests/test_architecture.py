"""The layout holds: layers only point down (import-linter's contracts in pyproject.toml), modules stay
small, and each job has one implementation that the others call (checked on the syntax trees, so
prose that names a function does not count)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llava_local", "convert", "train")
MAX_LINES = 450


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py") if "data" not in p.parts)


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _uses(path: Path) -> set[str]:
    """Names of functions called and attributes read in a module (`x.y(...)` gives "y")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Name):
            out.add(node.id)
    return out


def _where(names: set[str], packages=PACKAGES) -> dict[str, set[str]]:
    found = {}
    for p in _modules(*packages):
        hit = names & _uses(p)
        if hit:
            found[_rel(p)] = hit
    return found


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter) is not installed: pip install -e '.[test]'"
    p = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in p.stdout


def test_no_module_is_over_450_lines():
    long = {_rel(p): n for p in _modules(*PACKAGES) if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


def test_only_the_llm_module_builds_batches_and_decodes():
    native = {"llama_batch", "llama_batch_init", "llama_batch_get_one", "llama_decode", "llama_get_logits_ith",
              "llama_memory_clear", "llama_memory_seq_rm", "llama_memory_seq_cp", "_L"}
    assert _where(native) == {"llava_local/runtime/llm.py": native & _uses(REPO / "llava_local/runtime/llm.py")}
    assert {"llama_batch", "llama_decode", "_L"} <= _uses(REPO / "llava_local/runtime/llm.py")


def test_one_decode_loop():
    """Sampling from the last logits and the end-of-generation rule live in runtime/generate.py; the
    batched decoder uses its `next_token`, everything else its `Decode`. The engine only builds
    samplers (with a grammar for structured output) for those loops."""
    assert set(_where({"is_eog"})) <= {"llava_local/runtime/llm.py", "llava_local/runtime/generate.py",
                                       "llava_local/eval/quant_eval.py"}   # there: where a reference answer ends
    samplers = _where({"Sampler"}, packages=("llava_local", "convert"))
    decoders = _where({"Decode", "next_token", "BatchDecoder"})
    for module in samplers:
        assert module in decoders or module.endswith(("/sampling.py", "/generate.py", "runtime/engine.py")), module


def test_one_prompt_builder():
    """Rendering a conversation and tokenizing it for the runtime happens in prompts/turns.py: no
    other product module splits a rendering at the image marker."""
    splitters = {}
    for p in _modules("llava_local", "convert"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "split"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "IMAGE_MARKER"):
                splitters.setdefault(_rel(p), 0)
                splitters[_rel(p)] += 1
    assert set(splitters) <= {"llava_local/prompts/turns.py", "llava_local/prompts/templates.py"}


def test_one_manifest_module_one_atomic_write_one_logging_setup():
    assert set(_where({"read_manifest", "write_manifest", "find_manifests", "manifest_for"})) >= {
        "llava_local/runtime/model_pair.py", "convert/__init__.py"}
    for p in _modules(*PACKAGES):
        text = p.read_text(encoding="utf-8")
        if _rel(p) != "llava_local/formats/manifest.py":
            assert '"*.manifest.json"' not in text, _rel(p)
    assert set(_where({"basicConfig"})) == {"llava_local/logs.py"}
    renames = _where({"replace", "rename"})
    atomic = {m for m, names in renames.items()
              if any(isinstance(n, ast.Attribute) and n.attr in ("replace", "rename") and isinstance(n.value, ast.Name)
                     and n.value.id == "os" for n in ast.walk(ast.parse((REPO / m).read_text(encoding="utf-8"))))}
    # fileio: the helper; onnx_export: moves torch's staged file into the helper's temporary;
    # train/checkpoints: swaps a checkpoint directory with the previous one kept (two renames)
    assert atomic <= {"llava_local/fileio.py", "convert/onnx_export.py", "train/checkpoints.py"}


def test_benches_do_not_reach_into_tests():
    for p in sorted((REPO / "bench").glob("*.py")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if "sys.path" in line:
                assert "tests" not in line, f"{_rel(p)}: {line.strip()}"
        assert "from tests" not in p.read_text(encoding="utf-8") and "import tests" not in p.read_text(encoding="utf-8")


@pytest.mark.parametrize("package", ["llava_local.caption", "llava_local.eval", "llava_local.runtime",
                                     "llava_local.vision", "llava_local.prompts", "llava_local.formats"])
def test_library_packages_do_not_print(package):
    """Library code logs; only cli/ and the `python -m` entry points of a few modules print."""
    printing = [m for m in _where({"print"}, packages=("llava_local",)) if m.startswith(package.replace(".", "/") + "/")]
    assert not [m for m in printing if '__name__ == "__main__"' not in (REPO / m).read_text(encoding="utf-8")]
