"""What the standalone A/B scripts in benchmarks/ share on their command line: --rounds, --threads,
--load (busy processes beside the benchmark), --json (a results file moelab owns) and --overwrite.

    parser = argparse.ArgumentParser(description=...)
    parser.add_argument(...)                              # the script's own options
    args = parse_script_arguments(parser, JSON_FORMAT)    # torch's intra-op threads set
"""

from __future__ import annotations

import argparse

import torch

from moelab.io import check_output_file, has_json_format


def parse_script_arguments(parser: argparse.ArgumentParser, json_format: str, rounds: int = 5) -> argparse.Namespace:
    """`parser`'s arguments plus the shared ones; refuses a --json file that is not moelab's earlier
    result of `json_format` (unless --overwrite) before anything runs, and sets torch's threads."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the benchmark")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace moelab's earlier results file")
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, is_own=lambda p: has_json_format(p, json_format))
    torch.set_num_threads(args.threads)
    return args
