"""``python -m nemo_guide.theory [--out PNG] [--eta ...] [--k K]``: the table and the figure of Theorem 1's check."""

from nemo_guide.theory.report import main

raise SystemExit(main())
