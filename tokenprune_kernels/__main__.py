"""``python -m tokenprune_kernels`` is the ``tokenprune`` command."""

from tokenprune_kernels.cli import main

raise SystemExit(main())
