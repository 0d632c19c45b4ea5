"""Draw a captured graph with its scalable edges highlighted (``awqfx inspect --graph``).

Graphviz (``dot``) is used when installed; otherwise a self-contained SVG is laid out here: nodes
in topological order top to bottom, each in the column of its longest-path depth modulo a few
lanes, edges as straight lines, scale-group paths coloured per group. No external assets, so
the file opens anywhere.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import torch.fx as fx

from awqfx.graph import op_name
from awqfx.groups import Discovery

_PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
_SKIP = {"placeholder", "get_attr", "output"}


def _group_edges(gm: fx.GraphModule, d: Discovery) -> dict[tuple[str, str], int]:
    """Edges on a path from a group's input node to one of its consumers, coloured by group."""
    by_name = {n.name: n for n in gm.graph.nodes}
    edges: dict[tuple[str, str], int] = {}
    for k, g in enumerate(d.groups):
        start = by_name[g.input_node]
        targets = {by_name[c.node] for c in g.consumers}
        # nodes that can reach a consumer, walking back from the consumers to the start
        reach, stack = set(targets), list(targets)
        while stack:
            n = stack.pop()
            if n is start:
                continue
            for a in n.all_input_nodes:
                if a not in reach and a.op not in _SKIP:
                    reach.add(a)
                    stack.append(a)
        for n in reach:
            for a in n.all_input_nodes:
                if a in reach:
                    edges[(a.name, n.name)] = k
    return edges


def _label(gm: fx.GraphModule, n: fx.Node) -> str:
    return f"{n.name}: {op_name(gm, n)}"


def to_dot(gm: fx.GraphModule, d: Discovery) -> str:
    edges = _group_edges(gm, d)
    producers = {g.input_node: k for k, g in enumerate(d.groups)}
    lines = ["digraph awqfx {", "  rankdir=TB; node [shape=box, fontsize=9, height=0.2];"]
    for n in gm.graph.nodes:
        if n.op in _SKIP:
            continue
        color = _PALETTE[producers[n.name] % len(_PALETTE)] if n.name in producers else "black"
        lines.append(f'  "{n.name}" [label="{_label(gm, n)}", color="{color}"];')
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if a.op in _SKIP or n.op in _SKIP:
                continue
            k = edges.get((a.name, n.name))
            style = f'color="{_PALETTE[k % len(_PALETTE)]}", penwidth=2.5' if k is not None else 'color="#bbbbbb"'
            lines.append(f'  "{a.name}" -> "{n.name}" [{style}];')
    lines.append("}")
    return "\n".join(lines)


def to_svg(gm: fx.GraphModule, d: Discovery) -> str:
    edges = _group_edges(gm, d)
    nodes = [n for n in gm.graph.nodes if n.op not in _SKIP]
    depth: dict[str, int] = {}
    for n in nodes:
        depth[n.name] = 1 + max((depth.get(a.name, 0) for a in n.all_input_nodes), default=0)
    lanes, row_h, col_w = 6, 22, 210
    pos = {n.name: (20 + (depth[n.name] % lanes) * col_w, 20 + i * row_h) for i, n in enumerate(nodes)}
    width, height = 40 + lanes * col_w, 40 + len(nodes) * row_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">']
    for n in nodes:
        for a in n.all_input_nodes:
            if a.name not in pos:
                continue
            (x1, y1), (x2, y2) = pos[a.name], pos[n.name]
            k = edges.get((a.name, n.name))
            color, w = (_PALETTE[k % len(_PALETTE)], 2.5) if k is not None else ("#cccccc", 0.8)
            out.append(f'<line x1="{x1 + 80}" y1="{y1 + 8}" x2="{x2 + 80}" y2="{y2 + 8}" stroke="{color}" stroke-width="{w}"/>')
    producers = {g.input_node: k for k, g in enumerate(d.groups)}
    for n in nodes:
        x, y = pos[n.name]
        stroke = _PALETTE[producers[n.name] % len(_PALETTE)] if n.name in producers else "#666666"
        out.append(f'<rect x="{x}" y="{y}" width="170" height="16" rx="3" fill="white" stroke="{stroke}"/>')
        out.append(f'<text x="{x + 4}" y="{y + 12}">{html.escape(_label(gm, n))[:32]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_graph(gm: fx.GraphModule, d: Discovery, path: str | Path) -> str:
    """Write ``path`` (.svg or .html); returns which renderer was used (``graphviz`` or ``builtin``)."""
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".html"):
        raise ValueError(f"--graph must end in .svg or .html, got {path.name!r}")
    svg, renderer = None, "builtin"
    dot = shutil.which("dot")
    if dot:
        res = subprocess.run([dot, "-Tsvg"], input=to_dot(gm, d), capture_output=True, text=True, timeout=300)
        if res.returncode == 0:
            svg, renderer = res.stdout, "graphviz"
    if svg is None:
        svg = to_svg(gm, d)
    if path.suffix.lower() == ".html":
        legend = "".join(
            f'<li style="color:{_PALETTE[k % len(_PALETTE)]}">{html.escape(g.kind)}: {html.escape(g.name)} &rarr; '
            f'{html.escape(", ".join(c.weight for c in g.consumers))}</li>'
            for k, g in enumerate(d.groups)
        )
        svg = f"<!doctype html><html><head><meta charset='utf-8'><title>awqfx graph</title></head><body><h3>awqfx scale groups</h3><ul>{legend}</ul>{svg}</body></html>"
    path.write_text(svg)
    return renderer
