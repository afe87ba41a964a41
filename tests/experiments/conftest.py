"""Tests of the study scripts under experiments/, which are not part of the installed package."""

import sys
from pathlib import Path

# The scripts import each other by module name (`python experiments/sdmoe_evidence.py` puts their folder first).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
