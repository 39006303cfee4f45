"""The package's own shape: a light top-level import, and one home per helper."""

import subprocess
import sys

from conftest import REPO

HEAVY = ("optuna", "tensorly", "onnx", "onnxruntime", "thop")  # torch is the package's own need


def _loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_import_ranksearch_loads_no_heavy_module():
    assert _loaded_after("import ranksearch; assert ranksearch.__version__") == []


def test_load_model_needs_torch_not_the_search_stack():
    assert _loaded_after("from ranksearch import load_model") == []


def test_decompose_is_the_function_after_its_subpackage_is_imported():
    code = "import ranksearch.decompose.tucker2\nfrom ranksearch import decompose\nassert callable(decompose)"
    assert _loaded_after(code) == []


def test_the_public_names_resolve():
    import ranksearch

    assert all(callable(getattr(ranksearch, name)) for name in ranksearch.__all__ if name != "__version__")
    assert set(ranksearch.__all__) <= set(dir(ranksearch))
