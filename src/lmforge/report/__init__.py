"""Reports: what a run (or many) did and what it cost, as one self-contained HTML page.

data.py reads the ledger and derives the numbers, charts.py draws them with matplotlib (PNG bytes plus the series
drawn), html.py assembles the page. `lmforge report` (cli/report.py) writes it.
"""
