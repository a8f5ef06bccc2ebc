"""Planning: the scaling law and its fit (scaling.py), what the ledger's finished runs tell (history.py), and the
compute-optimal planner that turns a budget into a run to train (planner.py)."""
