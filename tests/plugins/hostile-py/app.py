"""A Python plugin that misbehaves on purpose, by its `mode` config.
Never ship this.

- `socket`: connects to `addr` and writes to it; the error is its answer.
- `loop`: never returns.
- `memory`: grows a list until something stops it.
- `huge`: returns a 20 MiB subject (the outcome limit is 16 MiB).
- `raise`: raises an exception with a message.
- `ok`: one email, subject "ok".
"""

import socket

from sendbox_pdk import Email, Outcome, WitWorld, config, on_webhook  # noqa: F401


@on_webhook
def handle(req):
    mode = config.get("mode", "ok")
    if mode == "socket":
        host, port = config.require("addr").rsplit(":", 1)
        # A socket by hand: `create_connection` would look the name up
        # first (through the `idna` codec, which the interpreter lacks) and
        # fail before asking the host for a socket at all.
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect((host, int(port)))
        s.sendall(b"exfiltrated")
        return Outcome.email(Email(to="ok@example.com", subject="connected"))
    if mode == "loop":
        n = 0
        while True:
            n += 1
    if mode == "memory":
        hoard = []
        while True:
            hoard.append(bytearray(1 << 20))
    if mode == "huge":
        return Outcome.email(Email(to="ok@example.com", subject="x" * (20 << 20)))
    if mode == "raise":
        raise RuntimeError("the plugin gave up on purpose")
    return Outcome.email(Email(to="ok@example.com", subject="ok"))
