"""The library reports through `logging`; the command lines (run_main) print its records on stderr."""

import logging

from bita_jax.cli import run_main


def test_run_main_prints_the_librarys_log_lines_on_stderr(capsys):
    def main(argv):
        logging.getLogger("bita_jax.training.loop").info("resumed from step %d of %d", 2, 4)
        logging.getLogger("bita_jax.api").debug("not shown")
        logging.getLogger("other").warning("not the library's: not printed by run_main")
        return 0

    assert run_main(main, []) == 0
    err = capsys.readouterr().err.splitlines()
    assert "resumed from step 2 of 4" in err and "not shown" not in err
    assert not any("not the library's" in line for line in err)


def test_outside_the_command_lines_the_library_prints_nothing(capsys):
    run_main(lambda argv: 0, [])  # its handler and level are removed again
    library = logging.getLogger("bita_jax")
    assert library.handlers == [] and library.level == logging.NOTSET
    logging.getLogger("bita_jax.api").info("a note")
    assert capsys.readouterr().err == ""
