"""The HAProxy of a local cluster: our own state folder, JSON error bodies, no orphans.

Ray Serve runs HAProxy as a child of its ``HAProxyManager`` actor, with its config, admin
socket and state files under ``/tmp/haproxy-serve`` (shared by every cluster on the host). A
local cluster of ``hybridserve serve`` moves them into a state folder of its own, named for its
HTTP port (``state_dir``), and points ``RAY_SERVE_HAPROXY_BINARY_PATH`` at a launcher
(this file, run by itself) that, before it execs the real binary:

* rewrites Ray's config so that the errors HAProxy answers for a request (502, 503, 504; 404
  where no route exists yet; 431 for headers above 32 KiB) carry the documented
  ``{"error": {"code", "message"}}`` body, the status clients can act on, and ``Retry-After``
  where retrying helps. Ray's template has no hook for this: its own error file (``500.http``,
  text/plain, 502/503/504 answered as 500) is replaced line for line. Errors of HAProxy's
  connection layer (400 for a malformed request or one whose request line and headers exceed
  ``tune.bufsize``, 64 KiB here; 408; 500/501) use HAProxy's built-in HTML whatever the
  errorfiles say (``h1_send_error`` in HAProxy's mux_h1.c): docs/operations.md lists them;
* drops Serve's fallback proxy from the HTTP backends (``without_fallback``): with no gateway
  replica up (one restarting), requests get HAProxy's 503 at once instead of waiting, with no
  deadline, in Serve's proxy for a replica to come back;
* asks the kernel to kill HAProxy when its parent (the manager actor) dies, so a server killed
  with SIGKILL takes its proxy with it.

A start also looks for a stale HAProxy of ours: one whose config lies in this state folder and
whose server (``server.pid``) is gone. It is stopped; an HAProxy of anyone else is never touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

SOURCE_HEADER = "X-Error-Source"  # "proxy" on the answers HAProxy gives itself
REAL_BINARY_ENV = "HYBRIDSERVE_HAPROXY_REAL_BINARY"
PID_FILE = "server.pid"
MARKER = "    # hybridserve: JSON error bodies (server/rayserve/haproxy.py)"
PR_SET_PDEATHSIG = 1

# status HAProxy would send -> (status sent, error code, message, Retry-After seconds or None)
ERRORS: dict[int, tuple[int, str, str, int | None]] = {
    400: (400, "invalid_input", "bad request: the proxy could not parse it", None),
    408: (408, "deadline_exceeded", "the request was not received in time (HAProxy's timeout http-request)", None),
    500: (500, "internal", "internal error at the proxy; see server logs", None),
    501: (501, "invalid_input", "not implemented: the proxy cannot handle this request's framing", None),
    502: (503, "model_not_ready", "the serving replica failed before answering; retry", 1),
    503: (503, "model_not_ready", "no replica is available to serve the request right now; retry", 1),
    504: (504, "deadline_exceeded", "the replica did not answer within the proxy's timeout "
                                    "(RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S)", 1),
}
REASONS = {400: "Bad Request", 408: "Request Timeout", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 504: "Gateway Timeout"}
# Ray routes nothing (its default backend's 404) while the application has no routable gateway
# replica, e.g. during a redeploy: with our one application at "/", that is a 503 to retry.
NO_ROUTE = json.dumps({"error": {"code": "model_not_ready", "message": "the application has no ready "
                                                                       "gateway replica right now; retry"}})
# Headers above HEADER_LIMIT get a JSON 431 from a frontend rule; a request line and headers above
# BUFSIZE never become a stream, and HAProxy's connection layer answers its own HTML 400.
HEADER_LIMIT = 32 * 1024
BUFSIZE = 64 * 1024
TOO_LARGE = json.dumps({"error": {"code": "invalid_input", "message": f"the request headers are too large "
                                                                       f"(more than {HEADER_LIMIT // 1024} KiB)"}})


def state_dir(http_port: int) -> Path:
    """The folder a local cluster serving ``http_port`` keeps its HAProxy files in."""
    return Path(tempfile.gettempdir()) / f"hybridserve-{http_port}"


def haproxy_env(folder: Path, real_binary: str) -> dict[str, str]:
    """Environment that moves Ray's HAProxy files into ``folder`` and runs it through our launcher."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / "haproxy"
    # This file run alone (stdlib only): importing the package would cost seconds per reload.
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I {shlex.quote(__file__)} "$@"\n')
    launcher.chmod(0o755)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        REAL_BINARY_ENV: real_binary,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(BUFSIZE),
    }


def error_file(status: int) -> str:
    """The raw HTTP response HAProxy sends instead of its own HTML for ``status``."""
    sent, code, message, retry_after = ERRORS[status]
    body = json.dumps({"error": {"code": code, "message": message}})
    head = [f"HTTP/1.1 {sent} {REASONS[sent]}", "Content-Type: application/json", "Cache-Control: no-cache",
            "Connection: close", f"{SOURCE_HEADER}: proxy", f"Content-Length: {len(body)}"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return "\r\n".join(head) + "\r\n\r\n" + body


def json_errors(config: str, folder: Path) -> str:
    """Ray's HAProxy config with our error files in its ``defaults`` (unchanged if already there)."""
    if MARKER in config:
        return config
    lines = [line for line in config.splitlines()
             if not line.strip().startswith(("errorfile ", "option splice-request", "option splice-response"))]
    # The whole request (up to tune.bufsize) is read before a server is picked: an error answered
    # at once (no gateway replica up) otherwise reaches a client still sending its body, and most
    # clients then report a broken connection, not the answer.
    ours = [MARKER, "    option http-buffer-request"]
    for status in ERRORS:
        path = folder / f"{status}.http"
        path.write_text(error_file(status))
        ours.append(f"    errorfile {status} {path}")
    at = lines.index("defaults") + 1
    lines[at:at] = ours
    at = lines.index("frontend http_frontend") + 2  # after its bind line
    lines.insert(at, f"    http-request return status 431 content-type application/json string '{TOO_LARGE}' "
                     f"hdr {SOURCE_HEADER} proxy if {{ req.hdrs,length gt {HEADER_LIMIT} }}")
    text = "\n".join(without_fallback(lines)) + "\n"
    return re.sub(r'http-request return status 404 content-type text/plain lf-string "[^\n]*"',
                  lambda _: f"http-request return status 503 content-type application/json string '{NO_ROUTE}' "
                            f"hdr Retry-After 1 hdr {SOURCE_HEADER} proxy", text)


def without_fallback(lines: list[str]) -> list[str]:
    """The HTTP backends without Serve's fallback proxy (their ``backup`` server).

    With no gateway replica up, HAProxy would pass requests to Serve's own proxy, which waits for
    a replica with no deadline: during a gateway restart they hang. Without it HAProxy answers
    at once with its 503 (JSON, ``Retry-After``). gRPC's fallback backend (ListApplications,
    Healthz) stays.
    """
    section, names, kept = "", set(), []
    for line in lines:
        if line and not line[0].isspace():
            section = line.strip()
        words = line.split()
        if section.startswith("backend ") and section != "backend grpc_fallback_backend" \
                and words[:1] == ["server"] and words[-1] == "backup":
            names.add(words[1])
            continue
        kept.append(line)
    return [line for line in kept if not (line.split()[:1] == ["use-server"] and line.split()[1] in names)]


def main() -> None:
    """The launcher: JSON errors into the config named by ``-f``, die with the parent, exec HAProxy."""
    args = sys.argv[1:]
    if "-f" in args:
        config = Path(args[args.index("-f") + 1])
        text = config.read_text()
        patched = json_errors(text, config.parent)
        if patched != text:
            config.write_text(patched)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    real = os.environ[REAL_BINARY_ENV]
    os.execv(real, [real, *args])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def owned_haproxies(folder: Path) -> list[int]:
    """HAProxy processes of this user whose config lies in ``folder`` (ours, nobody else's)."""
    prefix = str(folder) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        args = _cmdline(int(entry.name))
        if args and "haproxy" in Path(args[0]).name and "-f" in args[:-1] \
                and args[args.index("-f") + 1].startswith(prefix):
            found.append(int(entry.name))
    return found


def claim(folder: Path) -> list[int]:
    """Make ``folder`` this server's: refuse if its server lives, stop a stale HAProxy of ours.

    Returns the pids of the stale HAProxy processes stopped (empty when there were none).
    """
    folder.mkdir(parents=True, exist_ok=True)
    pid_file = folder / PID_FILE
    try:
        previous = int(pid_file.read_text())
    except (OSError, ValueError):
        previous = None
    if previous and previous != os.getpid() and _alive(previous) and "serve" in _cmdline(previous):
        raise SystemExit(f"error: another hybridserve serve (pid {previous}) uses {folder}: stop it first")
    stale = owned_haproxies(folder)
    stop_processes(stale)
    pid_file.write_text(str(os.getpid()))
    return stale


def stop_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def release(folder: Path) -> None:
    """After a clean stop: no HAProxy of ours is left, and the folder no longer names this server."""
    stop_processes(owned_haproxies(folder))
    (folder / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
