"""The captured program's picture: regions drawn as boxes (name, source line, placements, local shapes, costs),
inputs named as in the model, the global code between regions collapsed; rendered by Graphviz and read back
from the SVG's text elements (what a person sees), and as a PNG."""

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import localmap
from localmap import LocalMapError
from localmap.models import LlamaBlock
from localmap.program.draw import _label


class Loss(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        return self.inner(tokens).pow(2).mean()


@pytest.fixture
def prog(fake_mesh_2x2):
    torch.manual_seed(0)
    return localmap.capture(Loss(LlamaBlock(16, 4, 32, fake_mesh_2x2)), torch.randn(4, 6, 16))


def svg_texts(path) -> list[str]:
    """The text lines an SVG shows, in document order."""
    return [el.text or "" for el in ET.parse(path).iter() if el.tag.endswith("}text")]


def test_label_is_escaped_once():
    label = _label(['a "quoted" name', "back\\slash", "second line"])
    assert label == '"a \\"quoted\\" name\\lback\\\\slash\\lsecond line\\l"'
    assert "\\\\l" not in label and "\\n" not in label  # the line breaks stay DOT's, not literal text


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot (make graphviz)")
def test_region_picture_renders_readably(prog, tmp_path):
    svg = prog.save_svg(str(tmp_path / "program.svg"))
    texts = svg_texts(svg)
    assert not any("\\n" in t or "\\l" in t for t in texts), texts  # no literal escapes in what is shown
    for region in prog.regions:  # a box per region: name, source line, placements in -> out, shapes, check
        start = texts.index(region.name)
        box = texts[start:start + 12]
        assert re.fullmatch(r"at llama\.py:\d+", box[1]), box
        assert box[2].startswith("in ") and box[3].startswith("out ") and "(S(0)," in " ".join(box[2:4]), box
        assert any(t.startswith("local in ") and re.search(r"\d+x\d+", t) for t in box), box
        assert any(t.startswith("flops fwd") and "comm" in t for t in box), box
        assert "check: ok" in box, box
    shown = " ".join(texts)
    assert "tokens" in texts  # the program input by the forward's own parameter name, not primals_N / args[0]
    assert "inner.wq" in shown and "inner.w_gate" in shown  # parameters as the model names them
    assert not re.search(r"primals_\d", shown)
    assert re.search(r"global code: \d+ ops", shown)  # the work between regions, collapsed
    assert len(texts) < 80  # a picture of regions, not of every op
    png = prog.save_svg(str(tmp_path / "program.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot (make graphviz)")
def test_op_level_picture_is_an_option(prog, tmp_path):
    ops = prog.to_dot("ops")
    assert ops.count("->") > prog.to_dot().count("->")
    subprocess.run(["dot", "-Tsvg", "-o", str(tmp_path / "ops.svg")], input=ops, text=True, check=True)
    texts = svg_texts(tmp_path / "ops.svg")
    assert "attention_core.0" in texts and "tokens" in texts and "mm" in texts
    with pytest.raises(LocalMapError, match="level='regions'"):
        prog.to_dot("everything")


def test_region_edges_follow_the_data(prog):
    dot = prog.to_dot()
    first, second = (r.forward_node for r in prog.regions)
    # the attention's output reaches the MLP region through the global code between them
    assert f'"{first}" -> "{second}_code"' in dot and f'"{second}_code" -> "{second}"' in dot
