"""`scripts/mutation_check.py` stays valid: every mutation's anchor and named tests exist in the current source.

The script itself (a few minutes: each mutation runs its tests on a mutated copy of the package) is run by hand, see
`docs/design.md` §10. This test is what makes a refactor that moves an anchor fail fast, instead of leaving the script
to fail later.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


script = load_script()


@pytest.mark.parametrize("mutation", script.MUTATIONS, ids=lambda m: m.name)
def test_anchor_occurs_once_and_the_mutation_changes_the_code(mutation):
    text = script.find_anchor(mutation)
    assert mutation.replacement != mutation.anchor
    assert text.replace(mutation.anchor, mutation.replacement) != text
    compile(text.replace(mutation.anchor, mutation.replacement), mutation.file, "exec")  # the mutant still imports


@pytest.mark.parametrize("mutation", script.MUTATIONS, ids=lambda m: m.name)
def test_named_tests_exist(mutation):
    assert mutation.tests and not script.missing_tests(mutation)


def test_a_missing_anchor_fails_loudly(tmp_path):
    mutation = script.MUTATIONS[0]
    (tmp_path / mutation.file).parent.mkdir(parents=True)
    (tmp_path / mutation.file).write_text("# refactored\n")
    with pytest.raises(SystemExit, match="anchor not found.*update the mutation"):
        script.find_anchor(mutation, tmp_path)
