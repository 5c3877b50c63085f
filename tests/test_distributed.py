"""More than one process on localhost: the Gambler's ruin estimate and the inpainting scores are
the same on 1 or 2 processes, a missing peer ends with one line within the timeout, bad values
exit 2. (Training on two processes: tests/test_train.py.)"""

import importlib
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdnn import distributed

GR = [sys.executable, "-m", "experiments.gamblers_ruin", "--proposal", "state", "--paths", "200000", "--seed",
      "3", "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith(("[Gloo]", "WARNING"))]


def _one_process(module, argv, capsys) -> dict:
    """What `python -m experiments.<module> argv` prints (--json), run in this process."""
    capsys.readouterr()
    assert importlib.import_module(f"experiments.{module}").main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_gamblers_ruin_on_two_processes_equals_one_process(capsys):
    two = json.loads(_two_processes(GR))
    one = _one_process("gamblers_ruin", GR[3:], capsys)
    assert abs(two["estimate"] - one["estimate"]) <= 1e-12 * one["estimate"]
    assert two["std_error"] == pytest.approx(one["std_error"], rel=1e-9)


def _two_processes(command, timeout=120):
    """stdout of process 0 of `command` run as two local processes (process 1 must print nothing)."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([*command, "--coordinator", coordinator, "--num-processes", "2", "--process-id",
                               str(i), "--init-timeout", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[1][0].strip() == ""
    return outs[0][0]


@pytest.mark.slow
@pytest.mark.mnist
def test_inpainting_on_two_processes_equals_one_process(tmp_path, capsys):
    """Each process inpaints its share of the images (image i's noise is a function of i): the
    combined means are the one-process means."""
    cmd = [sys.executable, "-m", "experiments.inpaint", "--model", "nice", "--mask", "random50", "--method",
           "pgd", "--images", "3:8", "--steps", "3", "--json", "--out", str(tmp_path)]
    two = json.loads(_two_processes(cmd))
    one = _one_process("inpaint", cmd[3:], capsys)
    for key in ("psnr", "mse"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    # bits/dim rounds the fills to 8 bits (the cards' bound): a last-bit difference of a fill can
    # move a pixel across a bin edge
    assert two["bpd"] == pytest.approx(one["bpd"], rel=1e-5)
    assert two["accuracy"] == pytest.approx(one["accuracy"])  # the classifier's reading, combined
    for name, scores in one["baselines"].items():
        assert two["baselines"][name]["psnr"] == pytest.approx(scores["psnr"], rel=1e-6), name
        for stat in ("mean", "stderr"):  # paired statistics from the processes' sums and sums of squares
            assert two["paired"][name][stat] == pytest.approx(one["paired"][name][stat], rel=1e-5, abs=1e-9), name


@pytest.mark.slow
def test_a_missing_peer_exits_with_one_line_within_the_timeout():
    t0 = time.time()
    proc = subprocess.run([*GR, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
                           "--process-id", "0", "--init-timeout", "3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.time() - t0 < 30
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "not every process joined within 3 s" in errors[0], proc.stderr


@pytest.mark.parametrize("flags, match", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "needs --num-processes N and --process-id I"),
    (["--num-processes", "2", "--process-id", "1"], "need --coordinator"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0", "--init-timeout", "0"],
     "--init-timeout"),
])
def test_bad_multi_process_flags_exit_2_with_one_line(flags, match):
    proc = subprocess.run([*GR, *flags], capture_output=True, text=True, timeout=60)
    errors = _errors(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and match in errors[0], proc.stderr


def test_environment_settings_are_read_and_checked(monkeypatch):
    monkeypatch.setenv("JAXDNN_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAXDNN_NUM_PROCESSES='two'"):
        distributed.initialize()
    monkeypatch.setenv("JAXDNN_NUM_PROCESSES", "1")
    assert distributed.initialize() is False  # no coordinator: one process, nothing started


def test_single_process_helpers_are_the_identity():
    assert distributed.is_main()
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(distributed.gather(x), x)
    np.testing.assert_array_equal(distributed.from_every_process(x), x[None])
    assert distributed.process_share(7) == (0, 7)
