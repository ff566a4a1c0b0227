"""robust.cli, the one rule of every command line: a user's mistake is one ``error:`` line and exit code 2."""

from __future__ import annotations

import pytest

from robust.cli import EXIT_BAD_INPUT, exit_code
from robust.errors import RobustError


def fails_with(exc: Exception):
    def run():
        raise exc

    return run


def wrapped() -> ValueError:
    """A RobustError re-raised by a library as its own exception (jsonargparse's ValueError)."""
    try:
        raise RobustError("eps must be in [0, 1]")
    except RobustError as cause:
        try:
            raise ValueError("Problem with given class_path") from cause
        except ValueError as exc:
            return exc


def test_a_user_error_is_one_line_and_exit_code_2(capsys):
    assert exit_code(lambda: None) == 0
    assert exit_code(fails_with(RobustError("no such file: m.ckpt"))) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: no such file: m.ckpt\n"
    assert exit_code(fails_with(wrapped())) == 2
    assert capsys.readouterr().err == "error: eps must be in [0, 1]\n"


def test_a_bug_and_debug_keep_the_traceback(capsys):
    with pytest.raises(KeyError):
        exit_code(fails_with(KeyError("bug")))
    with pytest.raises(RobustError):
        exit_code(fails_with(RobustError("shown with its traceback")), debug=True)
    assert capsys.readouterr().err == ""


# ---- train.py's parser: every mistake is one line, exit code 2, the full usage only behind --help ----------------

# jsonargparse 4.53's own messages, as its parser hands them to error() (recorded from train.py fit)
LITERAL = (
    "Parser key \"model.attack\":\n  Expected a typing.Literal['none', 'fgsm', 'fgsm_rs', 'nfgsm', 'pgd']. "
    "Got value: pdg"
)
NESTED = (
    'Parser key "model.optimizer":\n  Type collections.abc.Callable[[collections.abc.Iterable], '
    "torch.optim.optimizer.Optimizer] expects a function or a callable class: Option 'lrr' is not accepted. Got "
    "value: Namespace(class_path='torch.optim.SGD', init_args=Namespace(lrr='0.1'))"
)
UNION = (
    'Parser key "trainer.max_epochs":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
    "[<class 'int'>, <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'int'>\n    - Expected a <class "
    "'NoneType'>\n  Given value type: <class 'str'>\n  Given value: x"
)


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            "unrecognized arguments: --model.epz 0.1",
            "unknown option --model.epz (did you mean --model.eps?); train.py fit --help lists every option",
        ),
        (LITERAL, "--model.attack pdg: not one of none, fgsm, fgsm_rs, nfgsm, pgd (did you mean pgd?)"),
        (
            NESTED,
            "--model.optimizer.init_args.lrr: torch.optim.SGD has no option lrr (did you mean lr?); "
            "--model.optimizer.help torch.optim.SGD lists them",
        ),
        (UNION, "--trainer.max_epochs x: expected int or null"),
        ("Parser key \"config\": File does not exist: '/a/b.yaml'", "--config /a/b.yaml: no such file"),
        (
            "argument subcommand: invalid choice: 'fti' (choose from 'fit', 'validate')",
            "unknown command fti (did you mean fit?); one of fit, validate",
        ),
    ],
)
def test_a_parser_error_becomes_one_sentence(message, line):
    from robust.cli import parser_error

    assert parser_error(message, "train.py fit", ["--model.eps", "--model.attack", "--config"]) == line


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    for cls in (CUDAAccelerator, MPSAccelerator):
        monkeypatch.setattr(cls, "is_available", staticmethod(lambda: False))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.epz", "0.1"], "error: unknown option --model.epz (did you mean --model.eps?)"),
        (["--model.attack", "pdg"], "error: --model.attack pdg: not one of none, fgsm, fgsm_rs, nfgsm, pgd"),
        (["--config", "configs/nope.yaml"], "error: --config "),
        (["--trainer.accelerator", "gpu"], "error: --trainer.accelerator gpu: this machine has no GPU"),
        (["--trainer.devices", "abc"], "error: --trainer.devices abc: not a number of CPU processes"),
        (
            ["--data.init_args.batch_sise", "8"],
            "error: --data.init_args.batch_sise: robust.data.modules.Digits has no ",
        ),
    ],
)
def test_each_train_mistake_is_one_line_and_exit_code_2(args, expected, no_gpu, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.main(["fit", "--config", "configs/digits.yaml", *args])
    out, err = capsys.readouterr()
    assert stop.value.code == 2
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert len((out + err).splitlines()) <= 3 and "Traceback" not in out + err
