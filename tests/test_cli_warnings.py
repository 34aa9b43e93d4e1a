"""The command line prints jaxcl's own warnings in one line, as it prints its errors."""
import warnings

from jaxcl import cli
from jaxcl.checkpoint import CheckpointWarning
from jaxcl.methods.base import UntrainedBackboneWarning


def test_jaxcl_warnings_are_one_line_and_others_keep_their_form(capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    cli._one_line_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("method clr trains only on top of a frozen backbone", UntrainedBackboneWarning)
        warnings.warn("restored unverified", CheckpointWarning)
        warnings.warn("a library's own", RuntimeWarning)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "jaxcl: warning: method clr trains only on top of a frozen backbone"
    assert err[1] == "jaxcl: warning: restored unverified"
    assert not any(line.startswith("jaxcl: warning: a library") for line in err)  # Python's own form
