"""The session layer: settings, and the refusal of fallbacks."""


import numpy as np
import pytest

from toolkit.errors import ArtifactBroken, RtkError
from toolkit.serving import sessions
from toolkit.serving.sessions import SessionSettings, open_onnxruntime

pytestmark = pytest.mark.serving


def test_settings_round_trip_and_refuse_nonsense():
    s = SessionSettings(device="cuda", threads=2, graph_optimization="extended")
    assert SessionSettings.from_dict(s.to_dict()) == s
    for bad in ({"engine": "tvm"}, {"engine": "openvino", "device": "cuda"}, {"graph_optimization": "max"},
                {"threads": 0}, {"precision_hint": "int4"}):
        with pytest.raises(RtkError):
            SessionSettings(**bad)
    with pytest.raises(RtkError, match="unknown session settings"):
        SessionSettings.from_dict({"device": "cpu", "turbo": True})


def test_a_file_onnxruntime_cannot_parse_is_broken_not_unavailable(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ArtifactBroken, match="model.onnx: onnxruntime cannot load it on CPUExecutionProvider"):
        open_onnxruntime(tmp_path / "model.onnx", SessionSettings())
    with pytest.raises(ArtifactBroken, match="missing"):
        open_onnxruntime(tmp_path / "nothing.onnx", SessionSettings())


def test_the_settings_reach_the_session(tiny_bundle):
    backend = open_onnxruntime(tiny_bundle / "model.onnx", SessionSettings(threads=1, graph_optimization="basic"))
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and str(options.graph_optimization_level).endswith("ENABLE_BASIC")
    assert backend.providers == ["CPUExecutionProvider"] and backend.settings.threads == 1


# ---------------------------------------------------------------- adding an engine: one opener, one ENGINES row


class EchoBackend(sessions.OrtBackend):
    """A stand-in engine: onnxruntime underneath, its own name and self-test key (as OpenVINO has)."""

    name = "echo"

    def selftest_key(self, file: str) -> str:
        return f"echo:{file}"


def _echo_engine(problem: str | None = None) -> sessions.Engine:
    def open_echo(path, settings, check):
        ort = sessions.open_onnxruntime(path, settings.on_engine("onnxruntime"), check_placement=check)
        return EchoBackend(ort.session, settings, ort.path)

    return sessions.Engine("echo", "Echo", ("cpu",), (".onnx",), open_echo, lambda settings: problem,
                           lambda settings: f"echo {settings.graph_optimization}", own=("graph_optimization",),
                           fallback="onnxruntime", variants=({"graph_optimization": "basic"},))


def _recommend(bundle, session: dict) -> None:
    import json

    from toolkit.core.manifest import Recommendation

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recommended"] = Recommendation(runtime="echo", artifact="model.onnx", precision="fp32",
                                             session=session).to_dict()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_an_engine_is_one_opener_and_one_row(tiny_bundle, tmp_path, monkeypatch):
    """With only a row in ENGINES, settings accept it, a recommendation of it is served by it (as recorded),
    runtime= forces it, its settings read in words, and the Classifier's answers are onnxruntime's."""
    import shutil

    from toolkit.serving.classifier import Classifier

    monkeypatch.setitem(sessions.ENGINES, "echo", _echo_engine())
    with pytest.raises(RtkError, match="echo cannot run on device 'cuda'"):
        SessionSettings(engine="echo", device="cuda")
    assert SessionSettings(engine="echo", tf32=True).trimmed() == SessionSettings(engine="echo")
    assert sessions.describe(SessionSettings(engine="echo")) == "echo all"
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _recommend(bundle, SessionSettings(engine="echo", threads=1, graph_optimization="basic").to_dict())
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    plain = Classifier.load(bundle, runtime="onnxruntime")
    served = Classifier.load(bundle)
    assert served.backend.name == "echo" and served.settings.graph_optimization == "basic"
    assert plain.backend.name == "onnxruntime" and plain.settings.engine == "onnxruntime"
    assert Classifier.load(tiny_bundle, runtime="echo").backend.name == "echo"
    np.testing.assert_allclose(served.logits(images), plain.logits(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(RtkError, match="runtime must be auto, onnxruntime, openvino, echo"):
        Classifier.load(bundle, runtime="tvm")


def test_an_engine_that_cannot_run_falls_back_with_a_warning_or_refuses_when_forced(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    from toolkit.serving.classifier import Classifier

    monkeypatch.setitem(sessions.ENGINES, "echo", _echo_engine(problem="echo is not installed"))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _recommend(bundle, SessionSettings(engine="echo").to_dict())
    with pytest.warns(UserWarning, match=r"recommends Echo, which cannot run here \(echo is not installed\): "
                                         r"serving model.onnx with onnxruntime instead"):
        clf = Classifier.load(bundle)
    assert clf.backend.name == "onnxruntime"
    with pytest.raises(RtkError, match="runtime echo asked for, but echo is not installed"):
        Classifier.load(bundle, runtime="echo")


@pytest.mark.torch_stack
def test_an_engine_row_reaches_the_runners_and_optimize_candidates(tiny_bundle, monkeypatch):
    """One registry row with the engine's session makes a runner of it, and optimize tries its variants."""
    from toolkit.core.bundle import Bundle
    from toolkit.evaluation import optimize
    from toolkit.evaluation.runners import registry
    from toolkit.evaluation.runners.base import RunOptions

    monkeypatch.setitem(sessions.ENGINES, "echo", _echo_engine())
    row = registry.RuntimeSpec("echo", "cpu", "echo", "fp32 ONNX files", registry._onnx("fp32", plain=True),
                               registry._session, session={"engine": "echo"})
    monkeypatch.setitem(registry.REGISTRY, "echo", row)
    bundle = Bundle.open(tiny_bundle)
    runners = [e for e in optimize.candidates(bundle, lambda: None, threads=1) if e.runtime == "echo"]
    assert [(r.artifact, r.settings.graph_optimization) for r in runners] == [("model.onnx", "all"),
                                                                               ("model.onnx", "basic")]
    runner = runners[1]
    runner.load()
    try:
        assert runner.backend.name == "echo" and runner.selftest_key == "echo:model.onnx"
        assert optimize.settings(runner) == "1 threads, echo basic"
        images = np.zeros((2, 32, 32, 3), np.uint8)
        reference = sessions.open_onnxruntime(tiny_bundle / "model.onnx", SessionSettings()).run(images)
        np.testing.assert_allclose(runner(images), reference, rtol=1e-5, atol=1e-5)
    finally:
        runner.release()
    assert registry.plan(bundle, ["echo"], lambda: None, RunOptions())[0].settings == SessionSettings(engine="echo")


# ---------------------------------------------------------------- OpenVINO's static batch buckets


def test_batch_buckets():
    assert [sessions.bucket_of(b) for b in (1, 2, 3, 5, 8, 9, 128, 129)] == [1, 2, 4, 8, 8, 16, 128, 128]


def test_openvino_static_batch_matches_the_dynamic_model_at_every_batch(tiny_bundle):
    pytest.importorskip("openvino")
    from toolkit.serving.sessions import open_openvino

    path = tiny_bundle / "model.onnx"
    dynamic = open_openvino(path, SessionSettings(engine="openvino", threads=1))
    static = open_openvino(path, SessionSettings(engine="openvino", threads=1, static_batch=True))
    assert sessions.describe(static.settings) == "precision f32, static batch"
    side = dynamic.input_shape[1]
    rng = np.random.default_rng(0)
    for batch in (1, 3, 8, 130):  # exact buckets, a padded one, and more than the largest bucket (two chunks)
        images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        want, got = dynamic.run_all(images), static.run_all(images)
        assert [g.shape for g in got] == [w.shape for w in want] and got[0].shape[0] == batch
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        assert static.run(images).dtype == np.float32
    assert static.details()["static_batches"] == [1, 2, 4, 8, 128]  # once per bucket used (130 = 128 + 2)
    first = static.run(images[:1])
    static.run(images[:2])[0][0] = 1e9  # a caller's change to a result is not seen by the next call
    np.testing.assert_array_equal(static.run(images[:1]), first)


def test_a_file_whose_batch_cannot_be_fixed_is_one_line(tiny_bundle):
    pytest.importorskip("openvino")
    from toolkit.serving.sessions import open_openvino

    static = open_openvino(tiny_bundle / "model.onnx", SessionSettings(engine="openvino", threads=1, static_batch=True))
    # the compiler holds the model it read: give its input a rank no image batch can be fixed on
    model = next(c.cell_contents for c in static._compile_static.__closure__ if hasattr(c.cell_contents, "reshape"))
    model.input(0).get_node().set_partial_shape(__import__("openvino").PartialShape([2, 3]))
    with pytest.raises(ArtifactBroken, match="model.onnx: OpenVINO cannot compile it for batch 1"):
        static.run(np.zeros((1, 32, 32, 3), np.uint8))
