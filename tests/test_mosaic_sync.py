"""Grid-wide waits inside one Mosaic GPU launch (`wina_jax.kernels.mosaic_sync`): on the CPU, lowering for
CUDA, the refusal of a grid that could deadlock, and the checks; on a Hopper GPU, every program's stores
before a wait visible to every program after it, on the full grid, and the watchdog giving a wait up
instead of hanging."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.mosaic_hlo import mosaic_modules, scratch_operand
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels import persistent_config as PC

GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels run on a Hopper GPU only")


def test_exchange_lowers_for_cuda():
  """It lowers, and its 8 programs share one semaphore (scratch_types would give each its own: the first H200
  run gave every wait up)."""
  f = jax.jit(lambda: ms.exchange(programs=8, waits=3))
  hlo = f.trace().lower(lowering_platforms=("cuda",)).as_text()
  assert scratch_operand(hlo) == "tensor<1xi32>"
  seen, gave_up, marks = jax.eval_shape(f)
  assert (seen.shape, gave_up.shape, marks.shape) == ((8, 3), (8,), (8, 3, 2))


def test_empty_waits_lower_for_cuda():
  hlo = jax.jit(lambda: ms.empty_waits(grid=8, waits=2, expect=8)).trace().lower(lowering_platforms=("cuda",))
  assert scratch_operand(hlo.as_text()) == "tensor<1xi32>"


def test_wait_barriers_are_unaligned():
  """The wait's barriers are `barrier.sync`, never `bar.sync` (aligned): LLVM copies a barrier between two
  `when(thread 0)` blocks into both branches, and on the H200 a warp reaching two copies of an aligned
  barrier hung every launch (session 22)."""
  (text,) = mosaic_modules(jax.jit(lambda: ms.empty_waits(grid=4, waits=2, expect=4)))
  assert text.count('"barrier.sync $0, 128;"') == 4 and '"bar.sync' not in text


def test_grid_that_could_deadlock_is_refused():
  """More programs than SMs (132 where the device reports none) never reach the kernel: GridError, not a hang."""
  sms = PC.sm_count() or ms.H100_SMS
  with pytest.raises(PC.GridError, match="co-resident.*deadlock"):
    jax.jit(lambda: ms.exchange(programs=sms + 1, waits=1)).trace()
  with pytest.raises(ValueError, match="k=0 must be >= 1"):
    ms.grid_wait(None, None, 0, 4)


def test_expected_seen_and_gave_up_check():
  np.testing.assert_array_equal(ms.expected_seen(3, 2), [[1000, 1001], [2000, 2001], [0, 1]])
  ms.check_gave_up(np.zeros(4, np.int32))
  with pytest.raises(ms.WaitGaveUp, match="3 grid-wide waits gave up.*2 of 4 programs"):
    ms.check_gave_up(np.array([0, 2, 1, 0], np.int32))


def test_clock_waits_across_a_wrap():
  """3 programs arriving 0.1 us apart, released 0.5 us after the last arrival, a phase every 2 us; the clock's
  low 32 bits wrap during the launch."""
  from wina_jax.bench.timing import clock_waits

  arrive = np.array([[2000 * k + 100 * p for k in range(3)] for p in range(3)]) + 2**32 - 3000
  release = np.broadcast_to(arrive.max(axis=0)[None] + 500, arrive.shape)
  marks = (np.stack([arrive, release], -1) % 2**32).astype(np.uint32).view(np.int32)
  assert clock_waits(marks) == {"release_us": 0.5, "per_wait_us": 2.0}
  assert clock_waits(marks[:, :1]) == {"release_us": 0.5}


@needs_gpu
@pytest.mark.parametrize("waits", [1, 6, 64])
@pytest.mark.parametrize("share", [1, 2])
def test_gpu_waits_order_memory_on_the_full_grid(waits, share):
  """Every program reads its neighbour's value of each phase after the wait, on all SMs and on half of them;
  no wait given up; each program's clock runs forward through its waits."""
  programs = PC.sm_count() // share
  seen, gave_up, marks = ms.exchange(programs=programs, waits=waits)
  ms.check_gave_up(gave_up)
  np.testing.assert_array_equal(np.asarray(seen), ms.expected_seen(programs, waits))
  ticks = np.asarray(marks).astype(np.int64).reshape(programs, -1)
  assert np.all(np.diff(ticks, axis=1) % 2**32 < 10**8)  # forward, under 0.1 s a step (the clock wraps)


@needs_gpu
def test_gpu_empty_waits_complete_on_the_full_grid():
  """The wait alone (as the MLP launch makes it), 6 in a row on every SM: none given up."""
  ms.check_gave_up(ms.empty_waits(grid=PC.sm_count(), waits=6, expect=PC.sm_count()))


@needs_gpu
def test_gpu_watchdog_gives_up_a_wait_that_cannot_complete():
  """One program waiting for two: the wait gives up after its spin budget and is counted, in ms, not forever."""

  gave_up = ms.empty_waits(grid=1, waits=1, expect=2, spin_limit=1000)
  np.testing.assert_array_equal(np.asarray(gave_up), [1])
  with pytest.raises(ms.WaitGaveUp):
    ms.check_gave_up(gave_up)


def test_sync_probe_script_on_the_cpu(tmp_path):
  """experiments.decode.sync_probe off the GPU: each case's child lowers it and reports the stage."""
  out = tmp_path / "probe.json"
  cmd = [
    sys.executable,
    "-m",
    "experiments.decode.sync_probe",
    "--cases=waits:1:2:1,exchange:2:1",
    f"--out={out}",
  ]
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  rows = json.loads(out.read_text())["rows"]
  assert [r["case"] for r in rows] == ["waits:1:2:1", "exchange:2:1"]
  assert all(r["rc"] == 0 and r["stages"]["lowered"] > 0 for r in rows)


def test_launch_floor_script_on_the_cpu(tmp_path):
  """experiments.decode.launch_floor off the GPU: every kernel lowers for CUDA; bad --kernels are refused."""
  out = tmp_path / "floor.json"
  base = [sys.executable, "-m", "experiments.decode.launch_floor", "--programs=2"]
  kernels = ["select", "triton", "mosaic:96", "mosaic+wait", "mosaic:96+wait+pdl"]
  subprocess.run([*base, f"--kernels={','.join(kernels)}", f"--out={out}"], check=True, timeout=300)
  res = json.loads(out.read_text())
  assert [(r["kernel"], r["programs"], r["lowered"]) for r in res["rows"]] == [(k, 2, True) for k in kernels]
  assert res["mosaic_pdl_launch"] == ms.pdl_launches() and "xla_flags" in res  # what the run had, recorded
  for bad_kernel in ("mosaic:300", "triton+wait", "mosaic+waits", "mosaic+pdl+wait", "triton+pdl"):
    bad = subprocess.run([*base, f"--kernels={bad_kernel}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "mosaic[:KB][+wait][+pdl] with KB in [1, 227]" in bad.stderr
  # a wait on more programs than can be resident (132 SMs assumed off the GPU) is refused in its row, not run
  cmd = [*base[:3], "--programs=200", "--kernels=mosaic,mosaic+wait", f"--out={out}"]
  subprocess.run(cmd, check=True, timeout=300)
  plain, wait = json.loads(out.read_text())["rows"]
  assert plain["lowered"] and "refused" not in plain
  assert "lowered" not in wait and "200 programs exceeds the 132 that can be co-resident" in wait["refused"]


def test_launch_floor_reserves_the_shared_memory_it_names():
  """'mosaic:KB' launches with KB KiB of dynamic shared memory, 'mosaic' with none; '+pdl' starts with the grid
  dependency's wait (read from the module; in a child process, as the script defines absl flags)."""
  probe = (
    "import jax, jax.numpy as jnp\n"
    "from experiments.decode import launch_floor\n"
    "from tests.mosaic_hlo import mosaic_modules\n"
    "for k in ('mosaic', 'mosaic:200', 'mosaic+pdl'):\n"
    "  x, counter = jnp.ones((4,), jnp.float32), jnp.zeros((3,), jnp.int32)\n"
    "  (m,) = mosaic_modules(jax.jit(launch_floor.launcher(k)), x, counter)\n"
    "  print(k, m.split('dynamic_shared_memory_size %c')[1].split('_')[0], m.count('griddepcontrol.wait'))\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
  )
  assert done.stdout.splitlines() == ["mosaic 0 0", f"mosaic:200 {200 * 1024} 0", "mosaic+pdl 0 1"]
