"""webhook-bridge, in Python: turns JSON webhooks into readable emails.

Understands two payloads:
- an Alertmanager-style alert list (``{"status", "alerts": [...]}``);
- a GitHub-style push (``{"ref", "repository", "commits": [...]}``).

Anything else gets a ``400`` with the reason and no email. The same emails
as the Rust ``webhook-bridge``, byte for byte.

Config: ``to`` (required, comma-separated), ``subject_prefix`` (default
``[webhook]``).
"""

from sendbox_pdk import Email, Outcome, Response, WitWorld, config, on_webhook  # noqa: F401


def bad_request(reason):
    return Outcome.respond(Response.json(400, {"error": reason}))


def one_line(s):
    line = s.split("\n", 1)[0]
    if line.endswith("\r"):
        line = line[:-1]
    return line[:200]


def escape(s):
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def text_field(obj, key, default=""):
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"`{key}` is not a string")
    return value


def alerts(value):
    status = text_field(value, "status")
    group = value.get("groupKey")
    items = value["alerts"]
    if not isinstance(items, list) or not all(isinstance(a, dict) for a in items):
        raise ValueError("`alerts` is not a list of alerts")
    parsed = []
    for a in items:
        labels = a.get("labels") or {}
        annotations = a.get("annotations") or {}
        parsed.append((text_field(a, "status"), dict(sorted(labels.items())), annotations,
                       text_field(a, "startsAt")))
    firing = sum(1 for a in parsed if a[0] == "firing")
    unique = sorted({a[1]["alertname"] for a in parsed if "alertname" in a[1]})
    n = len(parsed)
    subject = "{}: {} ({} alert{}, {} firing)".format(
        status.upper(), ", ".join(unique) if unique else "alerts", n, "" if n == 1 else "s", firing)
    text = f"{subject}\n\n"
    html = f"<h2>{escape(subject)}</h2>\n<ul>\n"
    for a_status, labels, annotations, starts_at in parsed:
        name = labels.get("alertname", "alert")
        if "summary" in annotations:
            summary = annotations["summary"]
        else:
            summary = annotations.get("description", "")
        rest = ", ".join(f"{k}={v}" for k, v in labels.items() if k != "alertname")
        text += f"- [{a_status}] {name}: {summary}\n  labels: {rest}\n  since: {starts_at}\n"
        html += (f"<li><b>[{escape(a_status)}] {escape(name)}</b>: {escape(summary)}"
                 f"<br><small>{escape(rest)}</small><br><small>since {escape(starts_at)}</small></li>\n")
    html += "</ul>\n"
    key = f"alerts:{group}:{status}" if isinstance(group, str) else None
    return subject, text, html, key


def push(value):
    git_ref = text_field(value, "ref")
    repo = value.get("repository")
    if not isinstance(repo, dict) or not isinstance(repo.get("full_name"), str):
        raise ValueError("`repository.full_name` is missing")
    full_name = repo["full_name"]
    commits = value["commits"]
    if not isinstance(commits, list):
        raise ValueError("`commits` is not a list")
    branch = git_ref[len("refs/heads/"):] if git_ref.startswith("refs/heads/") else git_ref
    pusher = value.get("pusher")
    who = pusher["name"] if isinstance(pusher, dict) and isinstance(pusher.get("name"), str) else "someone"
    n = len(commits)
    subject = f"{who} pushed {n} commit{'' if n == 1 else 's'} to {full_name}:{branch}"
    text = f"{subject}\n\n"
    html = f"<h2>{escape(subject)}</h2>\n<ul>\n"
    for c in commits:
        short = text_field(c, "id")[:7]
        author = c.get("author")
        author = author["name"] if isinstance(author, dict) and isinstance(author.get("name"), str) else ""
        title = one_line(text_field(c, "message"))
        text += f"- {short} {title} ({author})\n"
        url = c.get("url")
        link = f'<a href="{escape(url)}">{escape(short)}</a>' if isinstance(url, str) else escape(short)
        html += f"<li>{link} {escape(title)} <small>({escape(author)})</small></li>\n"
    html += "</ul>\n"
    compare = value.get("compare")
    if isinstance(compare, str):
        text += f"\nCompare: {compare}\n"
        html += f'<p><a href="{escape(compare)}">{escape(compare)}</a></p>\n'
    after = value.get("after")
    key = f"push:{full_name}:{after}" if isinstance(after, str) else None
    return subject, text, html, key


@on_webhook
def handle(req):
    try:
        value = req.json()
    except ValueError as e:
        return bad_request(str(e))
    if isinstance(value, dict) and "alerts" in value:
        try:
            subject, text, html, key = alerts(value)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return bad_request(f"not a valid alert list: {e}")
    elif isinstance(value, dict) and "commits" in value and "ref" in value:
        try:
            subject, text, html, key = push(value)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return bad_request(f"not a valid push event: {e}")
    else:
        return bad_request(
            'unrecognised payload: expected an Alertmanager alert list ("alerts") '
            'or a push event ("ref" and "commits")')
    to = config.get("to")
    if to is None:
        raise ValueError("config `to` is missing: set the recipient address")
    recipients = [r.strip() for r in to.split(",") if r.strip()]
    if not recipients:
        raise ValueError("config `to` is empty")
    prefix = config.get("subject_prefix", "[webhook]")
    return Outcome.email(Email(to=recipients, subject=f"{prefix} {one_line(subject)}",
                               text=text, html=html, idempotency_key=key))
