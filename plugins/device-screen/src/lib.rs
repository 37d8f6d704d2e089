//! device-screen: screens mail that devices hand to an SMTP listener.
//!
//! - `refuse_from` (comma-separated addresses): mail whose envelope sender
//!   is one of these is refused with `550 5.7.1` and the reason, so the
//!   device's owner sees it in the device's log.
//! - `drop_subject` (comma-separated, case-insensitive): mail whose subject
//!   contains one of these is accepted and dropped (a noisy "toner low").
//! - `tidy_to`: mail with attachments (a scan) becomes one tidy email to
//!   this address, "Scan from USER: N file(s)", with the same files.
//! - anything else is relayed as sent.
//!
//! Every dropped message is counted in state (`dropped`).

use sendbox_pdk::{Email, Plugin, config, state};
use sendbox_pdk_screen::{Screen, Submitted, Verdict, export_screening_plugin, refuse};

struct DeviceScreen;

impl Plugin for DeviceScreen {}

fn list(key: &str) -> Vec<String> {
    config::get(key)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Screen for DeviceScreen {
    fn on_submitted(m: Submitted) -> Result<Verdict, String> {
        if list("refuse_from").contains(&m.mail_from.to_ascii_lowercase()) {
            return Ok(refuse(
                550,
                format!("5.7.1 {} may not send through this relay", m.mail_from),
            ));
        }
        let subject = m.subject.to_ascii_lowercase();
        if list("drop_subject")
            .iter()
            .any(|s| subject.contains(s.as_str()))
        {
            let n: u64 = state::get("dropped")
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            state::set("dropped", (n + 1).to_string().as_bytes())?;
            return Ok(Verdict::Replace(Vec::new()));
        }
        if let Some(to) = config::get("tidy_to")
            && !m.attachments.is_empty()
        {
            let who = m.user.clone().unwrap_or_else(|| m.client.clone());
            let names: Vec<&str> = m.attachments.iter().map(|a| a.filename.as_str()).collect();
            let mut email = Email::to(&to)
                .subject(format!("Scan from {who}: {} file(s)", m.attachments.len()))
                .text(format!(
                    "{} sent {}.\nOriginal subject: {}\n",
                    who,
                    names.join(", "),
                    m.subject
                ))
                .build();
            email.attachments = m.attachments;
            return Ok(Verdict::Replace(vec![email]));
        }
        Ok(Verdict::Relay)
    }
}

export_screening_plugin!(DeviceScreen);
