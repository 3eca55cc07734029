#!/usr/bin/env python3
"""Extract the Finnish GIMP manual (Debian gimp-help-fi) to JSON Lines, one page per line.

    python tools/gimp_help_to_jsonl.py --output fi_gimp.jsonl.gz
    python tools/gimp_help_to_jsonl.py --output big.jsonl --repeat 50   # benchmark size

The bundled sample megatron_ext/assets/fi_gimp_sample.jsonl.gz was made with
    --output megatron_ext/assets/fi_gimp_sample.jsonl.gz --min-finnish 0.5
Logic: megatron_ext/demo/gimp_corpus.py.
"""

import argparse
import sys

from megatron_ext.demo import gimp_corpus
from megatron_ext.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gimp_corpus.add_arguments(parser)
    args = parser.parse_args()
    try:
        return gimp_corpus.run(args)
    except UserError as exc:
        print(f"gimp_help_to_jsonl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
