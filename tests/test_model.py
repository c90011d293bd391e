"""The CNN, its TorchScript export (metadata, checks, parity with eager) and the engine on mixed files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from imgpipe.errors import ConfigError, ImageError, ModelFileError
from imgpipe.model import export, jit, modelfile
from imgpipe.model.engine import Engine, select_device
from imgpipe.model.net import ConvNet, architectures, build_model, head_keys
from imgpipe.model.preprocess import Preset
from imgpipe.settings import SecuritySettings
from tests.images import write_bad, write_bomb, write_good

LABELS = [str(i) for i in range(10)]


def small_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet(10, in_channels=1, widths=(8, 16), convs_per_block=1)
    # Non-trivial batch-norm statistics so eval-mode parity is a real check.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def export_small(path: Path, net: ConvNet | None = None) -> export.Metadata:
    return export.export(
        net or small_net(),
        path,
        name="small",
        arch="convnet",
        arch_config={"widths": [8, 16], "convs_per_block": 1},
        labels=LABELS,
        preset=Preset(input_size=16, channels=1, mean=(0.3,), std=(0.4,)),
        val_accuracy=0.5,
    )


def test_convnet_halves_resolution_per_block_and_builds_torchvision_archs() -> None:
    net = ConvNet(5, in_channels=3, widths=(4, 8, 16))
    assert net.features(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 4, 4)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    resnet = build_model("resnet18", 7, 3)
    assert resnet(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    assert build_model("mobilenet_v3_small", 4, 3).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert {"convnet", "efficientnet_b0", "vit_b_16", "regnet_y_400mf"} <= set(architectures())
    with pytest.raises(ConfigError, match="unknown architecture 'resnet5'; did you mean resnet50"):
        build_model("resnet5", 3, 3)
    assert head_keys("resnet18", 7) == {"fc.weight", "fc.bias"}
    assert head_keys("mobilenet_v3_small", 7) == {"classifier.3.weight", "classifier.3.bias"}


def test_export_load_round_trip_keeps_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    written = export_small(path)
    _, metadata = modelfile.load(path)
    assert metadata.labels == tuple(LABELS) and metadata.preset == written.preset
    assert metadata.sha256 == written.sha256 == export_small(tmp_path / "again.pt").sha256  # same model, same id
    assert metadata.model_id == f"small@{written.sha256[:12]}" and metadata.version == 2
    assert metadata.torch_version == torch.__version__ and metadata.val_accuracy == 0.5
    assert metadata.arch == "convnet"


def test_model_id_covers_weights_graph_labels_and_preset(tmp_path: Path) -> None:
    """The sha256 changes with anything that changes a prediction, and only with that."""
    base = export_small(tmp_path / "base.pt")
    module, _ = modelfile.load(tmp_path / "base.pt")
    frozen = jit.freeze(module)  # weights folded into the graph: an empty state dict
    assert not frozen.state_dict()

    def stamped(net: torch.nn.Module, path: str, **changes: object) -> str:
        kw: dict[str, object] = {"labels": LABELS, "preset": base.preset, **changes}
        return export.export(
            net,
            tmp_path / path,
            name="small",
            arch="convnet",
            arch_config={},
            val_accuracy=None,
            **kw,  # type: ignore[arg-type]
        ).sha256

    assert stamped(module, "copy.pt") == base.sha256  # re-exported as it is: same id
    ids = {
        base.sha256,
        stamped(frozen, "frozen.pt"),
        stamped(module, "labels.pt", labels=[f"class-{label}" for label in LABELS]),
        stamped(module, "preset.pt", preset=Preset(input_size=16, channels=1, mean=(0.5,), std=(0.4,))),
        export_small(tmp_path / "weights.pt", small_net(seed=1)).sha256,
    }
    assert len(ids) == 5
    frozen_module, frozen_meta = modelfile.load(tmp_path / "frozen.pt")
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(frozen_module(x), module(x), atol=1e-5) and frozen_meta.sha256 in ids


def test_an_edited_archive_is_refused(tmp_path: Path) -> None:
    """Changing one weight byte inside the zip (CRC kept valid) no longer matches the sha256."""
    good = tmp_path / "good.pt"
    export_small(good)
    edited = tmp_path / "edited.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(edited, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.writestr(info, data)
    with pytest.raises(ModelFileError, match="does not match metadata"):
        modelfile.load(edited)


def test_metadata_version_1_files_still_load(tmp_path: Path) -> None:
    """Files exported before the sha256 covered graph, labels and preset: checked by their weights sha256."""
    net = small_net()
    meta = json.loads(export_small(tmp_path / "v2.pt", net).to_json())
    meta.update(version=1, sha256=export.weights_sha256(net))
    old = tmp_path / "v1.pt"
    jit.save(jit.script(net), old, {export.METADATA_FILE: json.dumps(meta)})
    _, metadata = modelfile.load(old)
    assert metadata.version == 1 and metadata.model_id == f"small@{meta['sha256'][:12]}"
    meta["sha256"] = "0" * 64
    jit.save(jit.script(net), old, {export.METADATA_FILE: json.dumps(meta)})
    with pytest.raises(ModelFileError, match="does not match metadata"):
        modelfile.load(old)


def test_exported_model_matches_eager_model_on_fixed_inputs(tmp_path: Path) -> None:
    """Parity: the TorchScript file computes what the eager network computes."""
    net = small_net(seed=3)
    path = tmp_path / "m.pt"
    export_small(path, net)
    module, _ = modelfile.load(path)
    inputs = torch.linspace(-2, 2, 4 * 16 * 16).reshape(4, 1, 16, 16)  # (B, C, H, W), fixed
    with torch.inference_mode():
        eager, scripted = net(inputs), module(inputs)
    assert torch.allclose(eager, scripted, atol=1e-5), (eager - scripted).abs().max()
    assert scripted.argmax(1).tolist() == eager.argmax(1).tolist()


def test_load_refuses_pickles_state_dicts_and_tampering(tmp_path: Path) -> None:
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelFileError, match="raw pickle"):
        modelfile.load(pickled)
    state = tmp_path / "state.pt"
    torch.save(small_net().state_dict(), state)
    with pytest.raises(ModelFileError, match="state dict"):
        modelfile.load(state)
    with pytest.raises(ModelFileError, match="not found"):
        modelfile.load(tmp_path / "absent.pt")

    bare = tmp_path / "bare.pt"
    jit.save(jit.script(small_net()), bare, {})
    with pytest.raises(ModelFileError, match="without imgpipe metadata"):
        modelfile.load(bare)

    good = tmp_path / "good.pt"
    meta = export_small(good)
    forged = json.loads(meta.to_json())
    forged["sha256"] = "0" * 64
    tampered = tmp_path / "tampered.pt"
    jit.save(jit.script(small_net()), tampered, {export.METADATA_FILE: json.dumps(forged)})
    with pytest.raises(ModelFileError, match="does not match metadata"):
        modelfile.load(tampered)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ModelFileError):
        modelfile.load(truncated)
    assert zipfile.is_zipfile(good)


def test_model_file_error_is_a_config_error() -> None:
    assert issubclass(ModelFileError, ConfigError)  # so the CLI exits 2 with one line


def test_select_device_explains_choices() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="valid: auto, cpu, cuda, cuda:N"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            select_device("cuda:0")


def test_engine_classifies_good_files_and_reports_each_bad_one(tmp_path: Path, default_model: Path) -> None:
    good = write_good(tmp_path / "good", 10)
    bad = write_bad(tmp_path / "bad")
    bomb = write_bomb(tmp_path / "bad" / "bomb.png", side=3000)
    big = tmp_path / "bad" / "big.png"
    big.write_bytes(good[0].read_bytes() + b"\0" * 60_000)
    engine = Engine.load(default_model, "cpu", security=SecuritySettings(max_file_bytes=50_000, max_pixels=1_000_000))
    inputs = (
        [str(p) for p in good[:5]] + [str(p) for p in bad.values()] + [str(bomb), str(big)] + [str(p) for p in good[5:]]
    )
    records = list(engine.classify(inputs, batch_size=4, lanes=3))
    assert [r["path"] for r in records] == inputs  # one record per input, in order
    by_path = {r["path"]: r for r in records}
    for path in good:
        record = by_path[str(path)]
        assert record["status"] == "ok" and record["label"] in LABELS
        assert record["topk"][0] == [record["label"], record["score"]] and len(record["topk"]) == 3
        assert record["model"] == engine.model_id
    expected = {
        "truncated": "decode",
        "corrupt": "decode",
        "empty": "empty",
        "not_image": "decode",
        "directory": "not_regular",
        "missing": "not_found",
    }
    for kind, reason in expected.items():
        record = by_path[str(bad[kind])]
        assert record["status"] == "error" and record["reason"] == reason, (kind, record)
        assert record["error"]
    assert by_path[str(bomb)]["reason"] == "too_many_pixels"
    assert by_path[str(big)]["reason"] == "too_large"


def test_engine_batches_match_single_predictions(default_model: Path, demo_data: Path) -> None:
    engine = Engine.load(default_model, "cpu")
    paths = sorted(str(p) for p in (demo_data / "val").rglob("*.png"))[:20]
    batched = [r["label"] for r in engine.classify(paths, batch_size=8)]
    single = [engine.predict(engine.load_image(p).unsqueeze(0))[0][0][0] for p in paths]
    assert batched == single


def test_image_error_reasons_are_bounded() -> None:
    with pytest.raises(ValueError, match="unknown image error reason"):
        ImageError("/etc/passwd", "paths are not reasons")


def test_torchscript_deprecation_is_handled_in_one_place(tmp_path: Path, default_model: Path) -> None:
    """torch 2.14's FutureWarnings for torch.jit are acknowledged in model/jit.py only: nothing leaks."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_small(tmp_path / "m.pt")
        modelfile.load(tmp_path / "m.pt")
        Engine.load(default_model, "cpu")
    with pytest.warns(FutureWarning, match="deprecated"):
        torch.jit.script(small_net())  # the warning itself is still there outside model/jit.py
