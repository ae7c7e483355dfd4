"""``python -m sortedcli.data.prepare`` (``make llm-data``): check that the offline language corpora are
installed and train the project's byte-level BPE tokenizer (see :func:`sortedcli.data.lm.main`).
A problem is one line on stderr and exit status 2."""

import sys

from sortedcli.data.lm import main
from sortedcli.errors import UsageError

if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
