"""Shared pytest setup. Area fixtures live in tests/<area>_fixtures.py; add here only what is shared."""

import os

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")
