"""Lines a job prints once (dat_ds/job_lines.py) on a real TCP store standing in for torchrun's agent
store, which outlives the ranks of every round of an elastic job."""
import datetime
import socket

import pytest
import torch.distributed as tdist

from dat_ds import job_lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent_store(monkeypatch):
    """A store hosted here, as torchrun's agent hosts it, and rank 1 of 2 of a worker round using it."""
    port = free_port()
    store = tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=5))
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "1", "WORLD_SIZE": "2",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_lines, "WAIT", 0.3)
    return store


def test_a_line_rank_0_posted_is_not_printed_again(agent_store, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store.set(job_lines._prefix() + "0", "no such file: data/x")
    job_lines.print_once("prog: error: ", "no such file: data/x")
    assert capsys.readouterr().err == ""
    job_lines.print_once("prog: error: ", "only here")  # a line rank 0 does not have: said by rank 1
    assert capsys.readouterr().err == "prog: error: rank 1: only here\n"


def test_a_restarted_round_does_not_read_the_last_rounds_lines(agent_store, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store.set(job_lines._prefix() + "0", "no such file: data/x")  # round 0's rank 0, long gone
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # round 1's rank 0 has not posted (it may not reach the line at all): rank 1 must say it itself
    job_lines.print_once("prog: error: ", "no such file: data/x")
    assert capsys.readouterr().err == "prog: error: rank 1: no such file: data/x\n"
