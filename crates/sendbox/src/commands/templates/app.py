"""{{name}}: a sendbox plugin. A webhook becomes an email to `to`."""

from sendbox_pdk import Email, Outcome, WitWorld, config, on_webhook  # noqa: F401


@on_webhook
def handle(req):
    return Outcome.email(Email(
        to=config.get("to", "ops@example.com"),
        subject=f"Webhook: {req.path}",
        text=req.text(),
    ))
