"""Rebuild the bundled catalog, bridge/data/catalog.json, from the surveys and the quality figures.

    python scripts/build_catalog.py [--seed PATH ...] [--quality PATH] [--out PATH]

The surveys (catalog-seed.json, catalog-seed-2.json) list each repository's files with the size the Hub
printed and the page it was read on; scripts/catalog/quality.json holds each model's published quality
figures (Arena, UGI) with their sources. `bridge.catalog.build_from_seed` joins them; this only reads and
writes the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge.catalog import build_from_seed  # noqa: E402

SEEDS = [REPO.parent / "shared" / "catalog-seed.json", REPO.parent / "shared" / "catalog-seed-2.json"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", action="append", type=Path, help="a survey file (default: both seeds)")
    parser.add_argument("--quality", type=Path, default=REPO / "scripts" / "catalog" / "quality.json")
    parser.add_argument("--out", type=Path, default=REPO / "bridge" / "data" / "catalog.json")
    args = parser.parse_args()
    seeds = [json.loads(p.read_text(encoding="utf-8")) for p in (args.seed or SEEDS)]
    quality = json.loads(args.quality.read_text(encoding="utf-8"))
    catalog = build_from_seed(*seeds, quality=quality)
    args.out.write_text(json.dumps(catalog, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    kinds: dict[str, int] = {}
    for model in catalog["models"]:
        kinds[model["kind"]] = kinds.get(model["kind"], 0) + 1
    print(f"{args.out}: {len(catalog['models'])} models ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
