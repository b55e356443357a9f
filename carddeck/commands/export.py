"""``carddeck export CHECKPOINT --out card.onnx``: compact ONNX card with parity checked on real images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from carddeck.commands.cli import out_dir, positive_int
from carddeck.export.formats import CALIBRATION_METHODS, FORMATS, SPARSE_ENCODINGS
from carddeck.export.parity import MAX_ACCURACY_DROP_POINTS, MAX_PROB_DIFF, MIN_AGREEMENT


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="card.pt written by `carddeck compress` (or its directory)")
    parser.add_argument("--out", type=onnx_out, required=True, help="ONNX file to write (card.json goes next to it)")
    parser.add_argument(
        "--data",
        default=None,
        help="dataset whose val split checks parity (default: the one the card was trained on, from its CardMeta)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="weight format; auto: the card's own (lrr, lobs, dsa -> sparse; biprop -> binary (int8); dense, "
        "filter, dipgo -> dense); dense and sparse apply to any card, binary to biprop cards only",
    )
    parser.add_argument("--sparse-encoding", default="bitmask", choices=SPARSE_ENCODINGS, help="lossless sparse form")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT, help="float formats: min top-1 agreement")
    parser.add_argument("--max-prob-diff", type=float, default=MAX_PROB_DIFF, help="float formats: max |dp|")
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=MAX_ACCURACY_DROP_POINTS,
        help="quantized formats: refuse when accuracy drops more than this many points (default 0.5)",
    )
    parser.add_argument("--parity-images", type=positive_int, default=None, help="use at most this many val images")
    parser.add_argument(
        "--calibration-images", type=positive_int, default=256, help="train images for int8 calibration"
    )
    parser.add_argument(
        "--calibration-method", default="minmax", choices=CALIBRATION_METHODS, help="int8 activation ranges"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def onnx_out(text: str) -> Path:
    """The ONNX file to write: its folder must be (or become) a directory, said before the export's work."""
    path = Path(text)
    out_dir(str(path.parent))
    return path


def run(args: argparse.Namespace) -> int:
    from carddeck.export.card_export import export_card
    from carddeck.export.parity import ParityPolicy

    report = export_card(
        args.checkpoint,
        args.out,
        data=args.data,
        format=args.format,
        policy=ParityPolicy(args.min_agreement, args.max_prob_diff, args.max_accuracy_drop),
        parity_images=args.parity_images,
        calibration_images=args.calibration_images,
        sparse_encoding=args.sparse_encoding,
        calibration_method=args.calibration_method,
        opset=args.opset,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(report.path),
                    "card_json": str(report.card_json),
                    "format": report.format,
                    "card": report.meta.key,
                    "size_bytes": report.size_bytes,
                    "dense_size_bytes": report.dense_size_bytes,
                    "compression_ratio": report.compression_ratio,
                    "parity": report.parity.to_dict(),
                    "details": report.details,
                },
                indent=2,
            )
        )
    else:
        print(report.summary())
    return 0
