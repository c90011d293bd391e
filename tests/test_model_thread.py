"""How the engine shares its threads. Small files are read and decoded one lane at a time. The GPU arrangement,
exercised on the CPU with its switches forced on: every batch runs on one thread of the engine's own whichever
lane asks (PyTorch's cuDNN plans are per thread), padded to a few sizes (the plans are per shape), with the same
records as the CPU default. On a GPU both are the default (model/engine.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from imgpipe import threads
from imgpipe.model import modelfile
from imgpipe.model.engine import Engine, padded_size, padded_sizes
from imgpipe.scan import scan
from tests.images import digit_like


def test_padded_sizes_are_powers_of_two_then_multiples_of_64() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 33, 63, 64)] == [1, 2, 4, 8, 8, 16, 64, 64, 64]
    assert [padded_size(n) for n in (65, 128, 129, 200, 256)] == [128, 128, 192, 256, 256]
    assert len({padded_size(n) for n in range(1, 257)}) == 10  # 256 batch sizes, 10 shapes


def test_one_thread_runs_every_call_on_its_thread_and_passes_errors_back() -> None:
    runner = threads.OneThread("test-one")
    seen: list[int] = []
    callers = [threading.Thread(target=lambda: seen.append(runner.run(threading.get_ident))) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert seen == [runner.ident] * 8 and runner.ident != threading.get_ident()
    # A call from inside a call runs there at once (a wait on its own queue would never end).
    assert runner.run(lambda: runner.run(threading.get_ident)) == runner.ident
    with pytest.raises(ZeroDivisionError):
        runner.run(lambda: 1 / 0)
    assert runner.run(sum, [1, 2]) == 3  # the thread survives a failed call
    names = {t.name for t in threading.enumerate()}
    assert any(name.startswith("test-one") for name in names)
    runner.close()
    assert not any(t.name.startswith("test-one") for t in threading.enumerate())


class _Recorder(torch.nn.Module):
    """Stands around the loaded TorchScript module: notes the thread and batch size of each call, then runs it."""

    def __init__(self, inner: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((threading.get_ident(), x.shape[0]))
        return self.inner(x)


def test_batches_from_many_lanes_run_on_the_model_thread_padded_with_the_cpu_defaults_records(
    default_model: Path, demo_data: Path
) -> None:
    paths = sorted(scan(demo_data))[:23]
    module, metadata = modelfile.load(default_model, "cpu")
    plain = Engine(module, metadata, torch.device("cpu"))
    arranged = Engine(module, metadata, torch.device("cpu"), model_thread=True, pad_batches=True)
    assert plain._model_thread is None and arranged._model_thread is not None
    recorder = _Recorder(arranged.module)
    arranged.module = recorder

    expected = list(plain.classify(paths, batch_size=5, lanes=3))
    got = list(arranged.classify(paths, batch_size=5, lanes=3))

    # Batches of 5, 5, 5, 5 and 3 from 3 lanes: all on the model thread, as 8, 8, 8, 8 and 4 rows.
    assert {ident for ident, _ in recorder.calls} == {arranged._model_thread.ident}
    assert sorted(size for _, size in recorder.calls) == [4, 8, 8, 8, 8]
    assert [r["path"] for r in got] == [r["path"] for r in expected] == [str(Path(p).absolute()) for p in paths]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["label"] == theirs["label"]
        assert [label for label, _ in mine["topk"]] == [label for label, _ in theirs["topk"]]
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
    arranged._model_thread.close()


def test_small_files_are_decoded_one_lane_at_a_time_and_larger_ones_in_parallel(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMGPIPE_SERIAL_DECODE_BYTES: a file up to that size is read and decoded holding the engine's decode turn
    (so lanes do not hand the GIL to each other at every system call); a larger one lets it go once read."""
    from imgpipe.model import engine as engine_module

    small = tmp_path / "small.png"
    digit_like(1).save(small)  # 8x8: about 140 bytes
    large = tmp_path / "large.png"
    digit_like(2, 200).save(large)  # noise, 200x200: about 40 kB
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert small.stat().st_size < 1000 < large.stat().st_size

    engine = Engine.load(default_model, "cpu", serial_decode_bytes=1000)
    held: list[bool] = []
    decode = engine_module.decode_image

    def noting(*args: object, **kwargs: object) -> object:
        held.append(engine._decode_turn.locked())
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_image", noting)
    engine.load_image(str(small))
    engine.load_image(str(large))
    assert held == [True, False]
    assert engine.safe_load_image(str(broken)).reason == "decode"  # type: ignore[union-attr]
    assert held == [True, False, True] and not engine._decode_turn.locked()  # a failure gives the turn back

    engine.serial_decode_bytes = 0  # IMGPIPE_SERIAL_DECODE_BYTES=0: every file in parallel
    engine.load_image(str(small))
    assert held[-1] is False


def test_the_serial_decode_setting_reaches_the_engine(default_model: Path) -> None:
    from imgpipe import defaults
    from imgpipe.settings import Settings

    assert Settings.from_env({}).batch.serial_decode_bytes == defaults.SERIAL_DECODE_BYTES
    chosen = Settings.from_env({"IMGPIPE_SERIAL_DECODE_BYTES": "0"}).batch.serial_decode_bytes
    assert chosen == 0
    assert Engine.load(default_model, "cpu", serial_decode_bytes=chosen).serial_decode_bytes == 0


def test_with_padding_the_warm_up_runs_every_padded_size_up_to_the_full_batch(default_model: Path) -> None:
    module, metadata = modelfile.load(default_model, "cpu")
    padded = _Recorder(module)
    Engine(padded, metadata, torch.device("cpu"), optimize=False, pad_batches=True, model_thread=True, warm_batch=20)
    # 20 images pad to 32: the plans of every size a batch of 1 to 20 pads to are built before the first batch.
    assert [size for _, size in padded.calls] == [2, 2, 1, 4, 8, 16, 32]
    assert padded_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and padded_sizes(200) == [*padded_sizes(64), 128, 192, 256]
    assert all(padded_size(rows) in padded_sizes(200) for rows in range(1, 201))
    # A huge largest batch: every size up to 512, then that batch's own only.
    huge = _Recorder(module)
    Engine(
        huge, metadata, torch.device("cpu"), optimize=False, pad_batches=True, model_thread=True, warm_batch=1000,
        cpu_infer_batch=1024,  # whole batches, as on a GPU (the CPU runs them in pieces of 32)
    )  # fmt: skip
    assert [size for _, size in huge.calls] == [2, 2, 1, *padded_sizes(512)[2:], 1024]
    plain = _Recorder(module)
    Engine(plain, metadata, torch.device("cpu"), optimize=False, warm_batch=20)
    assert [size for _, size in plain.calls] == [2, 2]  # the CPU default: no padding, no extra warm-up


def test_the_gpu_settings_table_runs_on_the_cpu_and_reports_every_setting(demo_data: Path, tmp_path: Path) -> None:
    """scripts/gpu_configs.py (run by scripts/gpu-check.sh on a GPU) at a tiny budget, on the CPU."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_configs.py"
    out = tmp_path / "configs.json"
    done = subprocess.run(
        [sys.executable, "-P", str(script), str(demo_data), "--device", "cpu", "--budget", "0.02", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["device"] == "cpu" and table["lanes"] >= 1
    for name in ("digits", "photos"):
        workload = table["workloads"][name]
        assert set(workload["settings"]) == {
            "current",
            "lanes call model",
            "no padding",
            "jit optimize on",
            "fp32",
            "contiguous",
            "plain",
        }
        for row in workload["settings"].values():
            assert row["load_s"] >= 0 and row["b64_ms"] > 0 and row["shapes_s"] > 0
            assert row["rate"] is None or row["rate"] > 0
        for key in ("decode_by_threads", "decode_by_threads_parallel"):  # serial small files, and none serial
            assert set(workload[key]) == {"1", "2", "4", "8", "16"}
            assert all(rate > 0 for rate in workload[key].values())
        assert f"{name}: current" in done.stdout


def test_a_dropped_engine_ends_its_model_thread_so_reloads_leak_no_threads(default_model: Path) -> None:
    """A worker's reload drops the old engine once its lanes are done with it: its model thread must end then."""
    import gc
    import time

    module, metadata = modelfile.load(default_model, "cpu")

    def model_threads() -> int:
        return sum(t.name.startswith("imgpipe-model") for t in threading.enumerate())

    before = model_threads()
    for _ in range(3):  # three "reloads"
        engine = Engine(module, metadata, torch.device("cpu"), model_thread=True, pad_batches=True)
        side = metadata.preset.input_size
        engine.predict(torch.zeros(3, metadata.preset.channels, side, side, dtype=torch.uint8))
        assert model_threads() == before + 1
        del engine
        deadline = time.monotonic() + 10
        while model_threads() > before and time.monotonic() < deadline:
            gc.collect()  # should the engine sit in a reference cycle: "garbage-collected" is the promise
            time.sleep(0.01)
        assert model_threads() == before


def test_fitting_sizes_are_the_largest_padded_sizes_below_and_only_a_padding_engine_uses_them(
    default_model: Path,
) -> None:
    from imgpipe.model.engine import fitting_size

    assert [fitting_size(n) for n in (0, 1, 2, 3, 25, 63, 64, 65, 127, 128, 200)] == [
        1, 1, 2, 2, 16, 32, 64, 64, 64, 128, 192,
    ]  # fmt: skip
    assert all(padded_size(fitting_size(n)) == fitting_size(n) <= max(1, n) for n in range(0, 300))
    module, metadata = modelfile.load(default_model, "cpu")
    assert Engine(module, metadata, torch.device("cpu"), pad_batches=True).fitting_batch(25) == 16
    assert Engine(module, metadata, torch.device("cpu")).fitting_batch(25) == 25  # the CPU default: any size


def test_the_shared_device_table_runs_the_model_in_several_processes_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_processes.py (gpu-check.sh --scaling: the model alone in processes sharing one GPU), on the CPU
    at a tiny budget: every process count gets a total rate."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_processes.py"
    out = tmp_path / "processes.json"
    command = [sys.executable, "-P", str(script), "--device", "cpu", "--budget", "0.05", "--processes", "1,2"]
    done = subprocess.run(
        [*command, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["device"] == "cpu" and table["batch"] == 64
    assert set(table["rates"]) == {"1", "2"} and all(rate > 0 for rate in table["rates"].values())
    assert "2 process(es) on cpu" in done.stdout
