#!/usr/bin/env python3
"""Submits mail to an SMTP listener with Python's smtplib, as a legacy app
would, and prints one JSON line per message: {"subject", "ok", "reply"}.

Each message is multipart (text, HTML and a binary attachment) and is
written, exactly as submitted, to OUT/<subject>.eml so a test can compare
what arrives upstream with what was sent.
"""
import argparse
import json
import os
import smtplib
import ssl
import sys
import threading
from email.message import EmailMessage
from email.utils import make_msgid


def message(args, subject):
    m = EmailMessage()
    m["From"] = f"Scanner <{args.sender}>"
    m["To"] = ", ".join(args.to)
    if args.bcc:
        m["Bcc"] = ", ".join(args.bcc)
    m["Subject"] = subject
    m["Message-ID"] = make_msgid(domain="office.example")
    m.set_content(f"Scan {subject} attached.\n.A line starting with a dot.\n")
    m.add_alternative(f"<p>Scan <b>{subject}</b> attached.</p>", subtype="html")
    m.add_attachment(bytes(range(256)) * 64, maintype="application", subtype="pdf", filename=f"{subject}.pdf")
    return m


def send_all(args, thread, results):
    try:
        if args.implicit_tls:
            ctx = ssl.create_default_context(cafile=args.cafile)
            s = smtplib.SMTP_SSL(args.host, args.port, context=ctx, timeout=60)
        else:
            s = smtplib.SMTP(args.host, args.port, timeout=60)
        s.ehlo("scanner.office.example")
        if args.starttls:
            s.starttls(context=ssl.create_default_context(cafile=args.cafile))
            s.ehlo("scanner.office.example")
        if args.user:
            s.login(args.user, args.password)
    except (smtplib.SMTPException, OSError) as e:
        for i in range(args.count):
            results.append({"subject": f"{args.prefix}-{thread}-{i}", "ok": False, "reply": str(e)})
        return
    for i in range(args.count):
        subject = f"{args.prefix}-{thread}-{i}"
        m = message(args, subject)
        raw = m.as_bytes(policy=m.policy.clone(linesep="\r\n"))
        if args.out:
            with open(os.path.join(args.out, subject + ".eml"), "wb") as f:
                f.write(raw)
        try:
            refused = s.sendmail(args.sender, args.to + args.bcc, raw)
            results.append({"subject": subject, "ok": not refused, "reply": "250"})
        except smtplib.SMTPResponseException as e:
            results.append({"subject": subject, "ok": False, "reply": f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}"})
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            results.append({"subject": subject, "ok": False, "reply": f"{code} {text.decode(errors='replace')}"})
        except (smtplib.SMTPException, OSError) as e:
            results.append({"subject": subject, "ok": False, "reply": str(e)})
    try:
        s.quit()
    except (smtplib.SMTPException, OSError):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--implicit-tls", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--sender", default="scanner@office.example")
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--bcc", action="append", default=[])
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefix", default="scan")
    p.add_argument("--out")
    args = p.parse_args()
    results = []
    threads = [threading.Thread(target=send_all, args=(args, t, results)) for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r))
    sys.exit(0)


main()
