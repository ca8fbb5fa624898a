"""Run the tests from the repository root's modules (model, cwpo, data, ...), never an installed copy."""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads make 2-core runs erratic
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.manual_seed(0)
