"""The planted bugs of tests/mutations.py, each caught by the tests named for it."""

import pytest

from tests import mutations

pytestmark = pytest.mark.host_only  # copies of the tree run under the interpreter: a CPU check


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_planted_bug_is_caught(mutation):
    caught, out = mutations.check(mutation)
    assert caught, f"{mutation.name} survived ({mutation.why}):\n{out[-3000:]}"


def test_a_mutation_whose_snippet_moved_is_an_error(tmp_path):
    moved = mutations.Mutation("moved", "fastrnn/modules.py", "no such code", "x", ("tests",))
    with pytest.raises(LookupError, match="occurs 0 times"):
        mutations.plant(moved, str(tmp_path / "copy"))
