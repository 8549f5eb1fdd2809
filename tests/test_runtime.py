"""How a stage fails: a user error is one line and status 2; a defect keeps its traceback."""
import pytest

from utils.errors import BasqError, CheckpointError, DataError, UsageError
from utils.runtime import fail_cleanly

from .conftest import run_script


@pytest.mark.parametrize("error", [UsageError, CheckpointError, DataError, BasqError])
def test_a_user_error_is_one_line_and_status_2(error, capsys):
    def stage(args):
        raise error("--flag x: cannot be used")

    with pytest.raises(SystemExit) as exit_:
        fail_cleanly(stage, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --flag x: cannot be used\n"


def test_a_defect_keeps_its_traceback():
    def stage(args):
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        fail_cleanly(stage, None)
    defect = "from utils.runtime import fail_cleanly; fail_cleanly(lambda args: int('x'), None)"
    run = run_script("-c", defect)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ValueError: invalid literal" in run.stderr
    assert not run.stderr.startswith("error:")
