"""The session layer: settings, and the refusal of fallbacks."""


import pytest

from toolkit.errors import ArtifactBroken, RtkError
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
