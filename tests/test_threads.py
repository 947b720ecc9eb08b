"""Threads (flowmap.training.threads): the cores other processes leave free, taken at a command's
start and followed during a fit, and a user's choice left alone."""

import math

import pytest
import torch


def test_the_thread_rule_takes_the_cores_other_processes_leave_free():
    from flowmap.training.threads import choose_threads, own_load

    assert choose_threads(2, 0.0) == 2 and choose_threads(2, 0.6) == 2
    assert choose_threads(2, 0.8) == choose_threads(2, 1.2) == 1  # one busy process, 2 cores
    assert choose_threads(2, 7.0) == 1 and choose_threads(16, 3.0) == 13
    # this process's share of the 1-minute load average follows the average's own update: 5 s
    # of imports at one core barely count, 10 minutes on 2 threads count as 2
    assert own_load(0.0, cpu_s=5.0, wall_s=5.0) == pytest.approx(1 - math.exp(-5 / 60))
    assert own_load(0.0, cpu_s=1200.0, wall_s=600.0) == pytest.approx(2.0, abs=1e-3)
    assert own_load(2.0, cpu_s=0.0, wall_s=60.0) == pytest.approx(2 * math.exp(-1))


def test_set_threads_follows_the_load_says_why_and_leaves_a_users_choice_alone(monkeypatch):
    from flowmap.training import threads

    before = torch.get_num_threads()
    said: list[str] = []
    for var in threads.THREADS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: 4)
    monkeypatch.setattr(threads, "_busy_now", lambda: 0.2)
    try:
        assert threads.set_threads(said.append) == 4 == torch.get_num_threads() and not said
        monkeypatch.setattr(threads, "_busy_now", lambda: 2.2)
        assert threads.set_threads(said.append) == 2 == torch.get_num_threads()
        assert "load the 4 cores with 2.2" in said[0] and "uses 2 threads" in said[0]
        assert "FLOWMAP_THREADS=N" in said[0]
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert threads.set_threads(said.append) == 3 and len(said) == 1
        monkeypatch.setenv("FLOWMAP_THREADS", "1")
        assert threads.set_threads(said.append) == 1 and len(said) == 1
        monkeypatch.setenv("FLOWMAP_THREADS", "many")
        with pytest.raises(ValueError, match="FLOWMAP_THREADS must be a number of threads"):
            threads.set_threads(said.append)
    finally:
        torch.set_num_threads(before)


def test_a_fit_follows_the_load_when_other_work_comes_and_goes(monkeypatch, capsys):
    from types import SimpleNamespace

    from flowmap.training import threads

    before = torch.get_num_threads()
    for var in threads.THREADS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    callback, trainer = threads.ThreadsForLoad(every_s=0.0), SimpleNamespace(world_size=1)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "_busy_now", lambda: 0.1)
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 2 and not capsys.readouterr().err
        monkeypatch.setattr(threads, "_busy_now", lambda: 1.1)  # another job started
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 1
        assert "load the 2 cores with 1.1" in capsys.readouterr().err
        monkeypatch.setattr(threads, "_busy_now", lambda: 0.2)  # it finished
        callback.on_train_batch_end(trainer)
        assert torch.get_num_threads() == 2 and "uses 2 threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
