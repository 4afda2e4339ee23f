"""``python -m weight_averaging.export --output_dir DIR``: leaderboard entries (see README)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from weight_averaging.algoperf_api import catalog
from weight_averaging.export import RULESETS, export


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m weight_averaging.export",
      description="Write self-contained AlgoPerf leaderboard entries "
                  "(DIR/submissions/{external_tuning,self_tuning}/<name>/).")
  parser.add_argument("--output_dir", required=True,
                      help="where submissions/ goes, e.g. a clone of submissions_algorithms")
  parser.add_argument("--submissions", nargs="+", default=None, metavar="NAME",
                      help=f"default: all of {', '.join(catalog.NAMES)}")
  parser.add_argument("--ruleset", default="both",
                      help=f"one of {', '.join(RULESETS)} or both (default: both)")
  parser.add_argument("--authors", nargs="+", default=[], metavar="NAME",
                      help="for the PR's YAML block")
  parser.add_argument("--affiliations", nargs="+", default=[], metavar="NAME",
                      help="for the PR's YAML block")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into an existing dir, replacing only the entries written")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    written = export(args.output_dir, args.submissions, args.ruleset, args.authors,
                     args.affiliations, args.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path in written:
    print(path)
  if not args.authors:
    print("note: no --authors: the YAML block's authors is empty; the leaderboard's PR "
          "check requires it", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
