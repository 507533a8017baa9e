"""The artifact format table (toolkit.core.formats): consistent in itself, and every key it names resolves
in the layer that owns it (a writer in export, a metadata reader in verify, a loader, a runtime)."""

import json

import pytest

from tests.conftest import copy_bundle, error_line, rtk
from toolkit.core import bundle, formats
from toolkit.core.manifest import FileEntry, check_plain_name
from toolkit.errors import ArtifactBroken, RtkError


def test_every_file_is_a_plain_name_listed_once():
    names = [name for row in formats.ROWS for name in row.names]
    for name in names:
        assert check_plain_name(name, "the format table") == name
    assert len(names) == len(set(names))
    assert len(formats.BY_NAME) == len(formats.ROWS)


def test_the_bundle_names_come_from_the_table():
    assert bundle.FILES is formats.FILES and bundle.FORMATS is formats.FORMATS
    assert bundle.PRECISIONS is formats.PRECISIONS and bundle.file_name is formats.file_name
    assert list(bundle.FILES) == [name for row in formats.ROWS for name in row.names]
    assert set(formats.DEFAULT_FORMATS) <= set(formats.FORMATS)
    for row in formats.ROWS:
        assert row.precisions and set(row.precisions) <= set(formats.PRECISIONS)
        assert formats.file_name(row.format, row.precisions[0]) in bundle.FILES


def test_a_row_built_from_another_names_a_format_choice():
    for row in formats.ROWS:
        assert row.choice or row.needs, f"{row.name} is neither a --format choice nor written along with one"
        if row.needs:
            assert formats.row(row.needs).choice
    assert formats.row("any-size").written_with(("onnx",)) and not formats.row("any-size").written_with(("pt2",))
    with pytest.raises(RtkError, match="unknown format 'tflite'"):
        formats.row("tflite")


def test_rows_that_share_a_manifest_format_are_run_and_read_alike():
    for row in formats.ROWS:
        first = formats.of_format(row.format)
        assert (row.engine, row.metadata, row.loader, row.selftest) == (
            first.engine, first.metadata, first.loader, first.selftest), row.name


def test_every_writer_key_is_an_exporter():
    from toolkit.export.exporter import WRITERS

    assert {row.writer for row in formats.ROWS} == set(WRITERS)


def test_every_format_can_be_reloaded_and_its_classes_read():
    from toolkit.evaluation.verify import CLASS_READERS
    from toolkit.export import loaders
    from toolkit.serving.sessions import ENGINES

    for row in formats.ROWS:
        assert row.metadata in CLASS_READERS, row.name
        if row.loader is None:
            assert row.engine in ENGINES, row.name
        else:
            assert callable(getattr(loaders, row.loader)), row.name


def test_every_file_of_every_format_has_a_runtime():
    from toolkit.evaluation.runners.registry import REGISTRY

    for row in formats.ROWS:
        for name, precision in row.files:
            extra = {"input": bundle.ANY_SIZE} if name == formats.ANY_SIZE_FILE else {}
            entry = FileEntry(row.format, precision, "0" * 64, 1, extra)
            runs = [r.name for r in REGISTRY.values() if r.accepts is not None and r.accepts(name, entry)]
            assert runs, f"no runtime runs {name}"
            assert all(REGISTRY[r].family in ("onnxruntime", "openvino", row.engine) for r in runs)


def test_an_unknown_format_is_refused_without_reading_the_file(tmp_path):
    from toolkit.evaluation.verify import file_classes

    with pytest.raises(ArtifactBroken, match=r"model\.tflite: unknown format 'tflite' \(rtk reads onnx, "):
        file_classes(tmp_path / "model.tflite", "tflite")  # not there: nothing may try to load it


def test_verify_refuses_a_bundle_file_of_an_unknown_format(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b", files=("model.onnx",))
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["format"] = "tflite"
    (b / "manifest.json").write_text(json.dumps(manifest))
    result = rtk("verify", b, "--random", "2")
    assert result.exit_code == 1
    assert "model.onnx in " in error_line(result) and "unknown format 'tflite'" in error_line(result)
