"""Our GGUF header parser against the `gguf` package's GGUFReader (llama.cpp's Python library):
every metadata value and every tensor's name, type, shape, offset and bytes."""

import numpy as np
import pytest
from gguf import GGUFReader

from gguf_files import write_llama_gguf
from plainllama.formats.gguf_reader import read_gguf


def assert_same_file(path):
    ours, theirs = read_gguf(str(path)), GGUFReader(str(path))
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours.metadata[name]
        if isinstance(expected, float) or (isinstance(expected, list) and expected and isinstance(expected[0], float)):
            assert np.allclose(got, expected), name
        else:
            assert got == expected, name
    assert set(ours.metadata) == {n for n in theirs.fields if not n.startswith("GGUF.")}
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.type_name == t.tensor_type.name
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.offset == t.data_offset
        raw = ours.data[info.offset : info.offset + t.n_bytes]
        assert np.array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8))


def test_default_model_header_matches_gguf_reader(model_path):
    assert_same_file(model_path)


@pytest.mark.parametrize("matrix_type", ["Q6_K", "BF16"])
def test_written_files_match_gguf_reader(tmp_path, vocab, matrix_type):
    assert_same_file(write_llama_gguf(tmp_path / "m.gguf", vocab, matrix_type=matrix_type, tied=True))
