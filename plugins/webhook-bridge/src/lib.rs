//! webhook-bridge: turns JSON webhooks into readable emails.
//!
//! Understands two payloads:
//! - an Alertmanager-style alert list (`{"status", "alerts": [...]}`);
//! - a GitHub-style push (`{"ref", "repository", "commits": [...]}`).
//!
//! Anything else gets a `400` with the reason and no email.
//!
//! Config: `to` (required, comma-separated), `subject_prefix` (default
//! `[webhook]`).

use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, Response, config, export_plugin};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write;

struct WebhookBridge;

#[derive(Deserialize)]
struct AlertList {
    #[serde(default)]
    status: String,
    #[serde(rename = "groupKey", default)]
    group_key: Option<String>,
    alerts: Vec<Alert>,
}

#[derive(Deserialize)]
struct Alert {
    #[serde(default)]
    status: String,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(rename = "startsAt", default)]
    starts_at: String,
}

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    after: Option<String>,
    repository: Repository,
    #[serde(default)]
    pusher: Option<Pusher>,
    commits: Vec<Commit>,
    #[serde(default)]
    compare: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

#[derive(Deserialize)]
struct Pusher {
    name: String,
}

#[derive(Deserialize)]
struct Commit {
    id: String,
    message: String,
    #[serde(default)]
    author: Option<Author>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct Author {
    name: String,
}

/// An email body in both forms.
struct Body {
    subject: String,
    text: String,
    html: String,
    key: Option<String>,
}

impl Plugin for WebhookBridge {
    fn on_webhook(req: HttpRequest) -> Result<Outcome, String> {
        let body = match read(&req) {
            Ok(body) => body,
            Err(answer) => return Ok(answer),
        };

        let to = config::get("to").ok_or("config `to` is missing: set the recipient address")?;
        let prefix = config::get_or("subject_prefix", "[webhook]");
        let mut recipients = to.split(',').map(str::trim).filter(|s| !s.is_empty());
        let first = recipients.next().ok_or("config `to` is empty")?;
        let mut email = Email::to(first);
        for r in recipients {
            email = email.to(r);
        }
        email = email
            .subject(format!("{prefix} {}", one_line(&body.subject)))
            .text(body.text)
            .html(body.html);
        if let Some(key) = body.key {
            email = email.idempotency_key(key);
        }
        Ok(Outcome::email(email.build()))
    }
}

/// The email a payload makes, or the `400` answer saying why it makes none.
fn read(req: &HttpRequest) -> Result<Body, Outcome> {
    // The common case in one typed pass: an alert list. Anything else, or
    // an alert list that does not read as one, takes the general path,
    // which decides by the keys present and names what is wrong. (Only an
    // object: serde would also read a struct from an array.)
    let object = req.body.trim_ascii_start().first() == Some(&b'{');
    if object
        && req.body.windows(8).any(|w| w == b"\"alerts\"")
        && let Ok(list) = serde_json::from_slice::<AlertList>(&req.body)
    {
        return Ok(alerts(list));
    }
    let value: Value = req.json().map_err(|reason| bad_request(&reason))?;
    if value.get("alerts").is_some() {
        serde_json::from_value::<AlertList>(value)
            .map(alerts)
            .map_err(|e| bad_request(&format!("not a valid alert list: {e}")))
    } else if value.get("commits").is_some() && value.get("ref").is_some() {
        serde_json::from_value::<Push>(value)
            .map(push)
            .map_err(|e| bad_request(&format!("not a valid push event: {e}")))
    } else {
        Err(bad_request(
            "unrecognised payload: expected an Alertmanager alert list (\"alerts\") or a push event (\"ref\" and \"commits\")",
        ))
    }
}

fn bad_request(reason: &str) -> Outcome {
    Outcome::respond(Response::json(400, &serde_json::json!({ "error": reason })))
}

fn one_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn escape(s: &str) -> String {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn alerts(list: AlertList) -> Body {
    let firing = list.alerts.iter().filter(|a| a.status == "firing").count();
    let names: Vec<&str> = list
        .alerts
        .iter()
        .filter_map(|a| a.labels.get("alertname").map(String::as_str))
        .collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    let subject = format!(
        "{}: {} ({} alert{}, {firing} firing)",
        list.status.to_uppercase(),
        if unique.is_empty() {
            "alerts".to_string()
        } else {
            unique.join(", ")
        },
        list.alerts.len(),
        if list.alerts.len() == 1 { "" } else { "s" }
    );
    let mut text = format!("{subject}\n\n");
    let mut html = format!("<h2>{}</h2>\n<ul>\n", escape(&subject));
    for a in &list.alerts {
        let name = a.labels.get("alertname").map_or("alert", String::as_str);
        let summary = a
            .annotations
            .get("summary")
            .or(a.annotations.get("description"))
            .map_or("", String::as_str);
        let labels: Vec<String> = a
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "alertname")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let labels = labels.join(", ");
        // Writing to a `String` cannot fail.
        let _ = writeln!(
            text,
            "- [{}] {name}: {summary}\n  labels: {labels}\n  since: {}",
            a.status, a.starts_at
        );
        let _ = writeln!(
            html,
            "<li><b>[{}] {}</b>: {}<br><small>{}</small><br><small>since {}</small></li>",
            escape(&a.status),
            escape(name),
            escape(summary),
            escape(&labels),
            escape(&a.starts_at)
        );
    }
    html.push_str("</ul>\n");
    let key = list
        .group_key
        .map(|g| format!("alerts:{g}:{}", list.status));
    Body {
        subject,
        text,
        html,
        key,
    }
}

fn push(p: Push) -> Body {
    let branch = p.git_ref.strip_prefix("refs/heads/").unwrap_or(&p.git_ref);
    let who = p.pusher.as_ref().map_or("someone", |u| u.name.as_str());
    let subject = format!(
        "{} pushed {} commit{} to {}:{branch}",
        who,
        p.commits.len(),
        if p.commits.len() == 1 { "" } else { "s" },
        p.repository.full_name
    );
    let mut text = format!("{subject}\n\n");
    let mut html = format!("<h2>{}</h2>\n<ul>\n", escape(&subject));
    for c in &p.commits {
        let short: String = c.id.chars().take(7).collect();
        let author = c.author.as_ref().map_or("", |a| a.name.as_str());
        let title = one_line(&c.message);
        text.push_str(&format!("- {short} {title} ({author})\n"));
        let link = match &c.url {
            Some(u) => format!("<a href=\"{}\">{}</a>", escape(u), escape(&short)),
            None => escape(&short),
        };
        html.push_str(&format!(
            "<li>{link} {} <small>({})</small></li>\n",
            escape(&title),
            escape(author)
        ));
    }
    html.push_str("</ul>\n");
    if let Some(compare) = &p.compare {
        text.push_str(&format!("\nCompare: {compare}\n"));
        html.push_str(&format!(
            "<p><a href=\"{0}\">{0}</a></p>\n",
            escape(compare)
        ));
    }
    let key = p
        .after
        .map(|sha| format!("push:{}:{sha}", p.repository.full_name));
    Body {
        subject,
        text,
        html,
        key,
    }
}

export_plugin!(WebhookBridge);
