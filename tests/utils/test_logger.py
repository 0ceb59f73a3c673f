"""setup_logger: console only on rank 0, one file per rank, no duplicates, warnings into the log."""

import logging
import re
import warnings

import pytest

from dino_research.utils.logger import setup_logger

LINE = re.compile(r"^\[\d\d/\d\d \d\d:\d\d:\d\d (?P<name>[\w.]+)\]: (?P<msg>.*)$")


@pytest.fixture
def fresh_logger(request):
    """A logger name private to the test; its handlers (and py.warnings') are closed afterwards."""
    name = f"dino_research_test.{request.node.name}"
    yield name
    for lg in (logging.getLogger(name), logging.getLogger("py.warnings")):
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()
    logging.captureWarnings(False)


def test_rank0_console_and_log_txt(tmp_path, capsys, fresh_logger):
    out = tmp_path / "out"
    logger = setup_logger(str(out), rank=0, name=fresh_logger)
    logger.debug("debug detail")
    logger.info("hello")
    logger.warning("careful")
    console = capsys.readouterr().out.splitlines()
    assert len(console) == 2  # INFO and above on the console
    m = LINE.match(console[0])
    assert m and m["name"] == fresh_logger and m["msg"] == "hello"
    assert LINE.match(console[1])["msg"] == "WARNING careful"
    file_lines = (out / "log.txt").read_text().splitlines()
    assert [LINE.match(x)["msg"] for x in file_lines] == ["debug detail", "hello", "WARNING careful"]
    assert not list(out.glob("log_rank*.txt"))


def test_rank1_file_only(tmp_path, capsys, fresh_logger):
    logger = setup_logger(str(tmp_path), rank=1, name=fresh_logger)
    logger.info("from rank one")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "log.txt").exists()
    assert LINE.match((tmp_path / "log_rank1.txt").read_text().strip())["msg"] == "from rank one"


def test_setup_twice_no_duplicates_and_new_dir(tmp_path, capsys, fresh_logger):
    setup_logger(str(tmp_path / "a"), name=fresh_logger)
    logger = setup_logger(str(tmp_path / "a"), name=fresh_logger)
    logger.info("once")
    assert capsys.readouterr().out.count("once") == 1
    assert (tmp_path / "a" / "log.txt").read_text().count("once") == 1

    setup_logger(str(tmp_path / "b"), name=fresh_logger).info("moved")
    assert capsys.readouterr().out.count("moved") == 1
    assert "moved" not in (tmp_path / "a" / "log.txt").read_text()
    assert (tmp_path / "b" / "log.txt").read_text().count("moved") == 1
    assert len(logger.handlers) == 2


def test_no_output_dir_console_only(tmp_path, capsys, fresh_logger):
    setup_logger(None, name=fresh_logger).info("console only")
    assert "console only" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_warnings_are_logged_not_hidden(tmp_path, capsys, fresh_logger):
    setup_logger(str(tmp_path), name=fresh_logger)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    assert "deprecated thing" in capsys.readouterr().out
    assert "deprecated thing" in (tmp_path / "log.txt").read_text()
