"""Write sendbox plugins in Python.

A plugin is a module (``app.py``) that registers a function for each kind
of event it handles and re-exports ``WitWorld``::

    from sendbox_pdk import Email, Outcome, Response, WitWorld, config, on_webhook

    @on_webhook
    def handle(req):
        deploy = req.json()
        return Outcome.email(
            Email(to=config.get("to", "ops@example.com"),
                  subject=f"{deploy['service']} {deploy['version']} deployed"))

built with ``sendbox plugin build`` (``componentize-py -d wit -w hook
componentize app -p . -p sdk/python -o app.wasm``). Events with no
registered function get an empty outcome (nothing sent, ``202`` for a
webhook). Raising an exception commits nothing: no email, no state write;
the exception's text is the reason the host logs (and a webhook gets
``500``). A plugin never sees a token, a secret, the filesystem, the
network or the environment: a socket it asks for is refused.

This package owns the guest side of ``wit/sendbox.wit`` for Python and
hides the generated bindings (``wit_world``); it must not know how the host
stores, checks or sends what a plugin returns.
"""

import json as _json

import wit_world
from componentize_py_types import Err as _Err
from wit_world.imports import host as _host
from wit_world.imports import state as _state
from wit_world.imports import types as _t

__all__ = [
    "Email", "Outcome", "Response", "Request", "FileEvent", "Tick",
    "on_webhook", "on_file", "on_schedule", "config", "log", "state", "WitWorld",
]


def _addresses(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    return list(value)


class Email:
    """One email to send. ``to``, ``cc`` and ``bcc`` take an address, a
    comma-separated string or a list; ``sender`` must be the account's
    mailbox or one the operator allowed."""

    def __init__(self, to, subject="", text=None, html=None, cc=None, bcc=None,
                 sender=None, reply_to=None, headers=None, idempotency_key=None):
        self.to = _addresses(to)
        self.cc = _addresses(cc)
        self.bcc = _addresses(bcc)
        self.subject = subject
        self.text = text
        self.html = html
        self.sender = sender
        self.reply_to = reply_to
        self.headers = list(headers or [])
        self.idempotency_key = idempotency_key
        self.attachments = []

    def attach(self, filename, content_type, data):
        """Adds an attachment (``data``: bytes, or text as UTF-8)."""
        if isinstance(data, str):
            data = data.encode()
        self.attachments.append(_t.Attachment(filename, content_type, bytes(data)))
        return self

    def _wit(self):
        return _t.Email(
            to=self.to, cc=self.cc, bcc=self.bcc, sender=self.sender,
            reply_to=self.reply_to, subject=self.subject, text=self.text,
            html=self.html, attachments=self.attachments,
            headers=[(str(k), str(v)) for k, v in self.headers],
            idempotency_key=self.idempotency_key,
        )


class Response:
    """A webhook's HTTP answer."""

    def __init__(self, status, body=b"", headers=None):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.headers = list(headers or [])

    @staticmethod
    def text(status, body):
        return Response(status, body, [("content-type", "text/plain; charset=utf-8")])

    @staticmethod
    def json(status, value):
        return Response(status, _json.dumps(value, separators=(",", ":")), [("content-type", "application/json")])

    def _wit(self):
        return _t.HttpResponse(self.status, [(str(k), str(v)) for k, v in self.headers], self.body)


class Outcome:
    """What the plugin wants done: emails to send, and for a webhook, an
    answer (default ``202``)."""

    def __init__(self, emails=None, response=None):
        self.emails = list(emails or [])
        self.response = response

    @staticmethod
    def none():
        return Outcome()

    @staticmethod
    def email(email):
        return Outcome([email])

    @staticmethod
    def respond(response):
        return Outcome(response=response)

    def _wit(self):
        return _t.Outcome(
            emails=[e._wit() for e in self.emails],
            response=self.response._wit() if self.response is not None else None,
        )


class Request:
    """A webhook's HTTP request (its signature already checked by the host)."""

    def __init__(self, raw):
        self.method = raw.method
        self.path = raw.path
        self.query = raw.query
        self.headers = list(raw.headers)
        self.body = bytes(raw.body)

    def header(self, name):
        """A header's value, by case-insensitive name."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def text(self):
        """The body as UTF-8 (``ValueError`` if it is not)."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the body is not UTF-8: {e}") from None

    def json(self):
        """The body as JSON (``ValueError`` with the reason if it is not)."""
        try:
            return _json.loads(self.body)
        except ValueError as e:
            raise ValueError(f"the body is not JSON: {e}") from None


class FileEvent:
    """A watched file that changed: ``change`` is ``created``, ``modified``
    or ``removed``; ``contents`` the bytes read (``None`` if removed or too
    large)."""

    def __init__(self, raw):
        self.watch = raw.watch
        self.path = raw.path
        self.change = raw.change.name.lower()
        self.size = raw.size
        self.contents = raw.contents


class Tick:
    """A schedule's run: its name and the time it was due (ms)."""

    def __init__(self, raw):
        self.schedule = raw.schedule
        self.scheduled_at_ms = raw.scheduled_at_ms


_handlers = {}


def on_webhook(fn):
    """Registers ``fn(request: Request) -> Outcome`` for webhooks."""
    _handlers["webhook"] = fn
    return fn


def on_file(fn):
    """Registers ``fn(file: FileEvent) -> Outcome`` for file changes."""
    _handlers["file"] = fn
    return fn


def on_schedule(fn):
    """Registers ``fn(tick: Tick) -> Outcome`` for schedules."""
    _handlers["schedule"] = fn
    return fn


class _Config:
    """The plugin's ``[plugins.NAME.config]`` values (never secrets)."""

    def get(self, key, default=None):
        value = _host.config(key)
        return default if value is None else value

    def require(self, key):
        """A value that must be set (``KeyError`` naming it otherwise)."""
        value = _host.config(key)
        if value is None:
            raise KeyError(f"config `{key}` is missing: set it in [plugins.NAME.config]")
        return value


class _Log:
    """Lines in the host's log, tagged with the plugin and event ids."""

    def debug(self, message):
        _host.log(_host.Level.DEBUG, str(message))

    def info(self, message):
        _host.log(_host.Level.INFO, str(message))

    def warn(self, message):
        _host.log(_host.Level.WARN, str(message))

    def error(self, message):
        _host.log(_host.Level.ERROR, str(message))


class _State:
    """The plugin's private key-value store, committed with the outcome."""

    def get(self, key):
        return _state.get(key)

    def set(self, key, value):
        if isinstance(value, str):
            value = value.encode()
        try:
            _state.set(key, bytes(value))
        except _Err as e:
            raise ValueError(f"state write refused: {e.value}") from None

    def delete(self, key):
        _state.delete(key)

    def keys(self, prefix=""):
        return _state.keys(prefix)

    def get_json(self, key):
        raw = _state.get(key)
        return None if raw is None else _json.loads(raw)

    def set_json(self, key, value):
        self.set(key, _json.dumps(value))


config = _Config()
log = _Log()
state = _State()


class WitWorld(wit_world.WitWorld):
    """The export componentize-py looks for: re-export it from ``app.py``."""

    def handle(self, event):
        if isinstance(event, _t.Event_Webhook):
            kind, arg = "webhook", Request(event.value)
        elif isinstance(event, _t.Event_File):
            kind, arg = "file", FileEvent(event.value)
        else:
            kind, arg = "schedule", Tick(event.value)
        fn = _handlers.get(kind)
        if fn is None:
            return Outcome()._wit()
        try:
            outcome = fn(arg)
        except Exception as e:  # the reason the host logs; nothing committed
            raise _Err(f"{type(e).__name__}: {e}")
        if outcome is None:
            outcome = Outcome()
        return outcome._wit()
