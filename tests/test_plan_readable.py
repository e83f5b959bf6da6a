"""``python -m ds_burst.plan`` on the small problems of a CPU run prints times that are not rounded to 0.0 ms (and
memory that is not rounded to 0.00 GiB): :func:`ds_burst.cli.plan.readable`."""

from __future__ import annotations

from ds_burst.cli.plan import main, readable


def test_readable_never_rounds_a_number_away():
    assert [readable(x) for x in (2427.94, 1.0, 0.1, 0.05, 0.0123, 4.5e-5, 0.0, -0.004)] == [
        "2427.9", "1.0", "0.1", "0.05", "0.0123", "4.5e-05", "0.0", "-0.004"]
    assert [readable(x, 2) for x in (17.126, 0.01, 0.000115)] == ["17.13", "0.01", "0.000115"]


def test_small_problem_table_shows_its_times(capsys):
    main(["--seq", "4096", "--gpus-per-node", "2", "--heads", "4", "--head-dim", "16"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:] if not line.startswith("choice")]
    assert rows and all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows), lines
    choice = lines[-1]
    assert choice.startswith("choice:") and float(choice.split("(")[1].split()[0]) > 0, choice
    large = [readable(x) for x in (541.26, 1886.64)]
    assert large == ["541.3", "1886.6"]  # times of 1 ms and more keep one decimal, as before


def test_small_model_memory_report_shows_its_sizes(capsys):
    main(["--memory", "--seq", "512", "--layers", "2", "--heads", "4", "--head-dim", "16", "--vocab", "128",
          "--gpus-per-node", "2"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines and all(float(line.split()[-1]) > 0 for line in lines if "params" in line or "grads" in line), lines
