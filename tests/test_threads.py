"""Thread counts from the cores (affinity, cgroup v1/v2 quota), the OpenMP policy, and adaptive batch sizing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe import threads
from imgpipe.batching import BatchSizer, Plan
from imgpipe.settings import BatchSettings, Settings


def _cgroup_v2(root: Path, files: dict[str, str]) -> Path:
    """A cgroup v2 tree laid out in a temp folder (the real /sys/fs/cgroup cannot be written in a test)."""
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_quota_is_the_tightest_from_our_cgroup_to_the_root(tmp_path: Path) -> None:
    root = _cgroup_v2(
        tmp_path, {"cpu.max": "max 100000\n", "kube/cpu.max": "300000 100000\n", "kube/pod/cpu.max": "150000 100000\n"}
    )
    assert threads.cgroup_cpu_limit(root, "0::/kube/pod\n") == 1.5
    assert threads.cgroup_cpu_limit(root, "0::/\n") is None  # "max": no quota
    assert threads.available_cpus(root, "0::/kube/pod\n") == min(len(os.sched_getaffinity(0)), 1)  # floor(1.5)


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(v1, "") == 2.5
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.cgroup_cpu_limit(v1, "") is None
    assert threads.cgroup_cpu_limit(tmp_path / "nothing", "") is None
    assert threads.available_cpus(tmp_path / "nothing", "") == len(os.sched_getaffinity(0))


def test_memory_is_the_machine_capped_by_the_cgroup_and_sizes_the_cpu_processes(tmp_path: Path) -> None:
    gib = 1 << 30
    meminfo = "MemTotal:       16777216 kB\nMemFree:         1000 kB\n"  # 16 GiB
    root = _cgroup_v2(tmp_path / "v2", {"memory.max": "max\n", "pod/memory.max": f"{3 * gib}\n"})
    assert threads.cgroup_memory_limit(root, "0::/pod\n") == 3 * gib
    assert threads.cgroup_memory_limit(root, "0::/\n") is None  # "max"
    assert threads.available_memory(root, "0::/pod\n", meminfo) == 3 * gib
    assert threads.available_memory(root, "0::/\n", meminfo) == 16 * gib
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert threads.cgroup_memory_limit(v1, "") is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2 * gib}\n")
    assert threads.available_memory(v1, "", meminfo) == 2 * gib
    # One process per core, as many as memory allows at CPU_PROCESS_MEMORY each, never none.
    assert threads.cpu_processes(cpus=8, memory=64 * gib) == 8
    assert threads.cpu_processes(cpus=8, memory=3 * gib) == 3
    assert threads.cpu_processes(cpus=2, memory=gib // 2) == 1
    assert threads.available_memory() > 0 and threads.cpu_processes() >= 1


def test_this_host_has_at_least_one_core_and_real_cgroup_files_parse() -> None:
    assert threads.available_cpus() >= 1
    limit = threads.cgroup_cpu_limit()
    assert limit is None or limit > 0


def test_thread_counts_leave_room_for_decoding_and_honour_settings() -> None:
    assert threads.torch_threads("cpu", cpus=1) == 1
    # By default a lane per core (decode_threads, capped at 16) runs its own batches on its share of the cores.
    assert threads.torch_threads("cpu", cpus=2) == 1 and threads.torch_threads("cpu", cpus=16) == 1
    assert threads.torch_threads("cpu", cpus=64) == 4
    assert threads.torch_threads("cuda", cpus=16) == 1  # host threads only launch kernels
    # Lanes (Engine.classify: each decodes and runs its own batches) share the cores, never oversubscribe them.
    assert threads.torch_threads("cpu", cpus=2, lanes=2) == 1 and threads.torch_threads("cpu", cpus=16, lanes=16) == 1
    assert threads.torch_threads("cpu", cpus=64, lanes=16) == 4 and threads.torch_threads("cpu", cpus=2, lanes=4) == 1
    assert threads.torch_threads("cuda", cpus=16, lanes=16) == 1
    assert threads.decode_threads(cpus=2) == 2 and threads.decode_threads(cpus=1000) == 16
    assert BatchSettings().decode_threads == threads.decode_threads()  # 0 (the default) means "from the cores"
    env = {"IMGPIPE_DECODE_THREADS": "3", "IMGPIPE_TORCH_THREADS": "5", "IMGPIPE_MAX_LATENCY_MS": "200"}
    batch = Settings.from_env(env, sections=("batch",)).batch
    assert (batch.decode_threads, batch.torch_threads, batch.max_latency_ms) == (3, 5, 200)


def test_openmp_wait_policy_is_passive_unless_the_user_chose_one() -> None:
    env: dict[str, str] = {}
    threads.configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.configure_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_entry_point_sets_the_policy_before_torch_is_imported() -> None:
    code = (
        "import os, sys\n"
        "from imgpipe.cli import main\n"
        "sys.argv = ['imgpipe', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "PASSIVE False"


def test_batch_sizer_fits_the_latency_target_to_the_measured_inference_time() -> None:
    sizer = BatchSizer(max_batch=64, max_wait_s=0.05, target_s=0.2)
    assert sizer.plan() == Plan(64, 0.05)  # nothing measured yet
    for _ in range(20):
        sizer.observe_batch(64, 64 * 0.004)  # 4 ms per image
    plan = sizer.plan()
    assert plan.size == 25  # 0.2 s / (2 x 4 ms)
    assert plan.wait_s == pytest.approx(0.0, abs=1e-9)
    for _ in range(20):
        sizer.observe_batch(8, 8 * 0.0001)  # a fast model: the configured limits bind
    assert sizer.plan().size == 64 and sizer.plan().wait_s == 0.05


def test_batch_sizer_shrinks_on_an_overshoot_and_grows_back_slowly() -> None:
    sizer = BatchSizer(max_batch=256, max_wait_s=0.05, target_s=0.1)
    sizer.observe_batch(10, 0.01)  # 1 ms per image: 50 fit by the model
    assert sizer.plan().size == 50
    for _ in range(256):
        sizer.observe_latency(0.3)  # measured p95 three times the target
    shrunk = sizer.plan().size
    assert shrunk < 50
    assert sizer.p95() == 0.3
    for _ in range(16 * 256):
        sizer.observe_latency(0.01)
    assert shrunk < sizer.plan().size <= 256
    with pytest.raises(ValueError):
        BatchSizer(max_batch=0, max_wait_s=0, target_s=1)


def test_take_more_takes_what_is_there_and_never_waits() -> None:
    import queue

    from imgpipe.threads import at_least, take_more

    source: queue.Queue[int | None] = queue.Queue()
    for i in range(5):
        source.put(i)
    got = [99]
    assert take_more(source, got, at_least(3)) is False and got == [99, 0, 1]  # stops once full
    assert take_more(source, got, at_least(10)) is False and got == [99, 0, 1, 2, 3, 4]  # no wait for more
    source.put(7)
    source.put(None)
    source.put(8)
    assert take_more(source, got, at_least(10)) is True and got[-1] == 7  # the sentinel stops it, not appended
    assert source.get_nowait() == 8


HEAP_SCRIPT = """
import gc, json, weakref
from imgpipe import heap

class Node:
    pass

kept = [Node() for _ in range(1000)]  # alive when the heap settles: frozen
garbage = Node()
garbage.self = garbage  # a cycle that is garbage already: collected, never frozen
probe = weakref.ref(garbage)
del garbage
heap.settle()
first = {"frozen": gc.get_freeze_count(), "cycle_freed": probe() is None}
late = Node()
late.self = late  # garbage made after settling is collected as usual
late_probe = weakref.ref(late)
del late
gc.collect()
print(json.dumps({**first, "late_freed": late_probe() is None, "tracked_after": len(gc.get_objects())}))
"""


def test_settling_the_heap_collects_the_garbage_then_freezes_what_is_alive() -> None:
    """imgpipe/heap.py: what is alive once loaded leaves the collector's reach; garbage is not frozen with it."""
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["frozen"] >= 1000 and result["cycle_freed"] and result["late_freed"]
    assert result["tracked_after"] < result["frozen"]  # full collections now see only what came later


def test_batch_sizer_plans_sizes_the_engine_runs_without_padding() -> None:
    """On a GPU the engine pads a batch to a power of two up to 64 (model/engine.py): a plan of 25 images would
    cost what 32 do, so the sizer plans 16, and the fill wait is worked out for that size."""
    from imgpipe.model.engine import fitting_size

    sizer = BatchSizer(max_batch=64, max_wait_s=0.05, target_s=0.2, fit=fitting_size)
    assert sizer.plan() == Plan(64, 0.05)  # nothing measured: the configured batch, itself a fitting size
    for _ in range(20):
        sizer.observe_batch(64, 64 * 0.004)  # 4 ms per image: 25 fit the target
    plan = sizer.plan()
    assert plan.size == 16
    assert plan.wait_s == pytest.approx(min(0.05, 0.2 - 2 * 16 * 0.004))
    unfitted = BatchSizer(max_batch=64, max_wait_s=0.05, target_s=0.2)
    unfitted.observe_batch(64, 64 * 0.004)
    assert unfitted.plan().size == 25
