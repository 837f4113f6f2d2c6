"""kernels/plainllama.h is the one description of the C kernels: the Python side must agree with it.

The oracle is a C compiler: a small program built against the header prints the size and field offsets
of each struct decode_layer reads, and the ctypes mirrors in decode_block.py must have the same. The
layouts, status codes and function signatures are read from the header by kernels/__init__.py; a
kernel called with a width it does not take returns its status, reported with the header's message.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from plainllama.engine.cpu import decode_block, kernels
from plainllama.engine.cpu.packed import LAYOUT_CODES

STRUCTS = {"MatrixPart": decode_block.MatrixPart, "Linear": decode_block.Linear, "Layer": decode_block.Layer}


def c_layout(tmp_path) -> dict[str, tuple[int, dict[str, int]]]:
    """struct name -> (sizeof, {field: offsetof}) as the C compiler lays them out."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler: the kernels are not built here either")
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{kernels.HEADER}"', "int main(void) {"]
    for name, mirror in STRUCTS.items():
        lines.append(f'    printf("{name} size %zu\\n", sizeof({name}));')
        for field, _ in mirror._fields_:
            lines.append(f'    printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
    lines.append("    return 0;\n}")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    subprocess.run([compiler, str(source), "-o", str(tmp_path / "layout")], check=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    layout: dict[str, tuple[int, dict[str, int]]] = {}
    for line in out.splitlines():
        struct, what, value = line.split()
        size, fields = layout.get(struct, (0, {}))
        layout[struct] = (int(value), fields) if what == "size" else (size, {**fields, what: int(value)})
    return layout


def test_ctypes_structs_match_the_c_header(tmp_path):
    layout = c_layout(tmp_path)
    assert set(layout) == set(STRUCTS)
    for name, mirror in STRUCTS.items():
        size, offsets = layout[name]
        assert ctypes.sizeof(mirror) == size, f"{name}: ctypes size {ctypes.sizeof(mirror)}, C size {size}"
        for field, _ in mirror._fields_:
            assert getattr(mirror, field).offset == offsets[field], f"{name}.{field}: ctypes offset differs from C's"


def test_layouts_and_statuses_come_from_the_header():
    text = kernels.HEADER.read_text()
    assert LAYOUT_CODES == {"q4": 0, "q8": 1, "f16": 2, "bf16": 3, "q6": 4, "q5": 5, "q2": 6, "q3": 7}
    for layout, code in LAYOUT_CODES.items():
        assert f"LAYOUT_{layout.upper()} = {code}," in text
    names = {name for name, _ in kernels.STATUS.values()}
    assert {"STATUS_OK", "STATUS_OUT_OF_MEMORY", "STATUS_NO_AMX", "STATUS_BAD_WIDTH", "STATUS_BAD_LAYOUT"} <= names
    assert all(message for code, (_, message) in kernels.STATUS.items() if code != 0)
    # every function the header declares is bound with as many arguments as it declares
    assert {
        "q4_matmul",
        "q8_matmul",
        "q6_matmul",
        "q2_matmul",
        "q3_matmul",
        "f16_matmul",
        "bf16_matmul",
        "decode_layer",
        "amx_matmul",
        "read_bytes",
    } <= set(kernels.PROTOTYPES)
    assert len(kernels.PROTOTYPES["amx_matmul"][1]) == 7 and len(kernels.PROTOTYPES["q2_matmul"][1]) == 9
    assert len(kernels.PROTOTYPES["decode_layer"][1]) == 13 and kernels.PROTOTYPES["read_bytes"][0] is ctypes.c_double


@pytest.mark.skipif(not kernels.available(), reason="the C kernels cannot be built on this machine")
@pytest.mark.parametrize("kernel, K", [("q8_matmul", 32), ("f16_matmul", 48)])
def test_a_width_the_kernel_does_not_take_is_reported_as_such(kernel, K):
    """q4/q8 read 64 inputs at a time, 16-bit rows 32: a narrower K returns STATUS_BAD_WIDTH, and
    check() says so (it once reported this code as 'AMX not allowed')."""
    x, out = torch.zeros(1, K), torch.zeros(1, 4)
    if kernel == "q8_matmul":
        args = (torch.zeros(4, K, dtype=torch.int8).data_ptr(), torch.zeros(4, K // 32, dtype=torch.float16).data_ptr())
    else:
        args = (torch.zeros(4, K, dtype=torch.float16).data_ptr(),)
    code = kernels.function(kernel)(x.data_ptr(), 1, K, *args, 4, out.data_ptr())
    assert kernels.STATUS[code][0] == "STATUS_BAD_WIDTH"
    with pytest.raises(RuntimeError, match="not a multiple of the kernel's block"):
        kernels.check(code, kernel)
    with pytest.raises(MemoryError, match="out of memory"):
        kernels.check(-1, kernel)
