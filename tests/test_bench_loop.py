"""bench_loop records the command it ran as absl parses it back (boolean flags included)."""

from absl import flags
from absl.testing import flagsaver

from experiments.quality import bench_loop


def test_recorded_command_round_trips_boolean_flags():
  with flagsaver.flagsaver():
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    flags.FLAGS["torch"].parse("false")
    flags.FLAGS["repeats"].parse("3")
    args = bench_loop._flag_args()
    assert "--notorch" in args and "--repeats=3" in args, args
    assert not any(a.startswith("--torch=") for a in args), args
    # what absl writes, absl reads back to the same values
    fresh = flags.FlagValues()
    flags.DEFINE_bool("torch", True, "", flag_values=fresh)
    flags.DEFINE_integer("repeats", 5, "", flag_values=fresh)
    fresh(["prog", *args])
    assert (fresh.torch, fresh.repeats) == (False, 3)
