"""``detkit convert --from torchvision SRC.pth --out CKPT [--num-classes K] [--overwrite]``

Maps torchvision's ``fasterrcnn_resnet50_fpn`` weights onto detkit's R50-FPN Faster R-CNN
(``detkit.engine.convert``).
"""

from __future__ import annotations

from pathlib import Path

from detkit.engine.convert import convert_torchvision
from detkit.errors import UsageError

NAME = "convert"


def add_parser(sub) -> None:
    cv = sub.add_parser(NAME, help="convert foreign weights to a detkit checkpoint")
    cv.add_argument("--from", dest="source", required=True, choices=["torchvision"])
    cv.add_argument("src", help="torchvision fasterrcnn_resnet50_fpn state_dict (.pth)")
    cv.add_argument("--out", required=True)
    cv.add_argument("--num-classes", type=int, help="foreground classes (default: from the weights)")
    cv.add_argument("--overwrite", action="store_true")
    cv.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    info = convert_torchvision(args.src, out, num_classes=args.num_classes)
    print(f"wrote {out}: {info}")
    return 0
