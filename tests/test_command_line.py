"""What result files record as their command: the run's arguments as given, shell-quoted, after python -m."""

import shlex
import sys

from experiments import common


def test_command_line_is_the_arguments_as_given(monkeypatch):
  argv = ["/x/bench_loop.py", "--notorch", "--precisions=float32", "--out=run 1.json"]
  monkeypatch.setattr(sys, "argv", argv)
  line = common.command_line("experiments.quality.bench_loop")
  assert line == "python -m experiments.quality.bench_loop --notorch --precisions=float32 '--out=run 1.json'"
  assert shlex.split(line)[3:] == argv[1:]  # a shell gives the script back the same arguments
