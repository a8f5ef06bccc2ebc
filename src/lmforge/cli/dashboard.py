"""`lmforge dashboard`: serve a web page of the ledger's runs with live charts, and a chat playground."""

from __future__ import annotations

import argparse

import uvicorn

from lmforge.cli.common import err, existing_ledger
from lmforge.cli.serve import bind
from lmforge.errors import UsageError

HELP = "web page of runs with live-updating charts, and a chat playground for `lmforge serve`"
DESCRIPTION = """\
Serve a web page that lists the ledger's runs (name, kind, status, steps, val bpb, energy, cost) and draws the
selected run's loss and validation bpb against step, updated every 2 s while it trains. Its playground chats
with the model that `lmforge serve` serves at --serve-url (relayed through this server, so nothing else needs
to be reachable from the browser): replies stream in, with temperature, top_p and max_tokens settings, and each
answer shows its tokens, joules and, when the server runs with --guard, the guard's verdicts. The page, its
script and its chart library (uPlot) are served from this package: nothing is loaded from the network. The
dashboard only reads the ledger. JSON endpoints: /api/runs, /api/runs/RUN, /api/runs/RUN/metrics?since=STEP.

examples:
  lmforge dashboard                     (then open http://127.0.0.1:8100)
  lmforge serve --ckpt my-run --guard builtin --port 8000
  lmforge dashboard --port 8100 --serve-url http://127.0.0.1:8000/v1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; the playground can use the model, so think before opening it to a network)")
    p.add_argument("--port", type=int, default=8100, help="TCP port (default 8100; 0 = any free port)")
    p.add_argument("--serve-url", default="http://127.0.0.1:8000/v1", metavar="URL",
                   help="the /v1 URL of `lmforge serve` for the playground (default http://127.0.0.1:8000/v1, "
                   "`lmforge serve`'s own default)")


def run(args: argparse.Namespace) -> int:
    from lmforge.dashboard.app import create_app  # fastapi and httpx load only when the dashboard runs

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must lie in 0..65535, got {args.port}")
    if not args.serve_url.startswith(("http://", "https://")):
        raise UsageError(f"--serve-url must be an http:// or https:// URL, got {args.serve_url!r}; e.g. "
                         f"http://127.0.0.1:8000/v1")
    ledger_path = existing_ledger(args)
    sock = bind(args.host, args.port)
    try:
        app = create_app(ledger_path, args.serve_url)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        host = f"[{args.host}]" if ":" in args.host else args.host
        err.print(f"dashboard at http://{host}:{sock.getsockname()[1]} | ledger {ledger_path} | playground via "
                  f"{args.serve_url} | Ctrl-C stops it", soft_wrap=True, markup=False)
        server.run(sockets=[sock])  # until Ctrl-C or SIGTERM, which uvicorn raises again once it has shut down
    except KeyboardInterrupt:  # Ctrl-C is how a dashboard is meant to stop
        pass
    finally:
        sock.close()
    return 0
