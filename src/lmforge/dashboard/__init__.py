"""`lmforge dashboard`: a web page listing the ledger's runs with live charts, and a chat playground for a model
that `lmforge serve` serves. app.py holds the routes, data.py the ledger queries, static/ the page."""
