"""`python -m skyrt_demo.train`: see cli.py."""
from .cli import main

raise SystemExit(main())
