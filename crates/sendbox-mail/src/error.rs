//! Send failures, classified so the caller can answer one question: retry,
//! give up, or stop and tell the operator.

/// What kind of failure, and so what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Try again later (4xx, network trouble, timeouts, token endpoint down).
    Transient,
    /// This message will never go through as it is (5xx on a recipient or
    /// the content).
    Permanent,
    /// The account's credentials were refused: pause the account's queue.
    Authentication,
    /// The account or server is misconfigured (no STARTTLS, SMTP AUTH
    /// disabled, bad CA file): pause the account's queue.
    Configuration,
}

/// A failed send: the kind, the server's reply when there was one, and what
/// to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?} failure{}: {message}{}", code.map(|c| format!(" ({c}{})", enhanced.as_deref().map(|e| format!(" {e}")).unwrap_or_default())).unwrap_or_default(), fix.as_deref().map(|f| format!(" — {f}")).unwrap_or_default())]
pub struct SendError {
    kind: FailureKind,
    /// The SMTP reply code, e.g. 451.
    pub code: Option<u16>,
    /// The enhanced status code, e.g. `5.7.139`.
    pub enhanced: Option<String>,
    /// What the server (or the client) said.
    pub message: String,
    /// How to fix it, for the failures we know.
    pub fix: Option<String>,
    /// The message's data was handed over before the failure: the server
    /// may have it.
    after_data: bool,
}

impl SendError {
    /// A failure of the given kind without a server reply.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        SendError {
            kind,
            code: None,
            enhanced: None,
            message: message.into(),
            fix: None,
            after_data: false,
        }
    }

    /// Marks a failure that came after the message's data was sent (a
    /// timeout or a dropped connection waiting for the final reply).
    pub fn after_data(mut self) -> Self {
        self.after_data = true;
        self.message = format!(
            "{} (after the message was sent: the server may have it, so it is not sent again at once)",
            self.message
        );
        self
    }

    /// Whether the server may have accepted the message despite the
    /// failure: resending at once could deliver it twice.
    pub fn may_have_been_delivered(&self) -> bool {
        self.after_data
    }

    /// Names the recipient a refusal was for.
    pub fn for_recipient(mut self, address: &str) -> Self {
        self.message = format!("recipient {address}: {}", self.message);
        self
    }

    /// Adds a hint for the operator.
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
    /// Retry later.
    pub fn is_transient(&self) -> bool {
        self.kind == FailureKind::Transient
    }
    /// Give up on this message.
    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }
    /// Stop sending from this account until the operator acts.
    pub fn pauses_account(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Authentication | FailureKind::Configuration
        )
    }

    /// Classifies an SMTP reply: code, enhanced code and text.
    pub fn from_reply(code: u16, text: &str) -> Self {
        let enhanced = enhanced_code(text);
        let e = enhanced.as_deref().unwrap_or("");
        let (kind, fix) = match (code, e) {
            (535, "5.7.139") => (
                FailureKind::Configuration,
                Some(
                    "SMTP AUTH is disabled for this tenant or mailbox: run `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` (or enable it tenant-wide with `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`) and wait up to an hour",
                ),
            ),
            (535, _) | (534, _) => (
                FailureKind::Authentication,
                Some(
                    "the server rejected the access token: check that the app has SMTP.SendAsApp (app-only) or SMTP.Send (delegated) permission, that the Exchange service principal has mailbox access, and that the mailbox name matches",
                ),
            ),
            (530, _) => (
                FailureKind::Authentication,
                Some(
                    "the server requires authentication before sending (530 5.7.57): the account must authenticate with XOAUTH2",
                ),
            ),
            (554, _) | (550, _) if text.contains("SendAsDenied") => (
                FailureKind::Permanent,
                Some(
                    "the mailbox has no Send As right for this From address: grant it with `Add-RecipientPermission`, or send from the account's own address",
                ),
            ),
            (432, _) | (421, _) => (FailureKind::Transient, None),
            (400..=499, _) => (FailureKind::Transient, None),
            (500..=599, _) => (FailureKind::Permanent, None),
            _ => (FailureKind::Transient, None),
        };
        SendError {
            kind,
            code: Some(code),
            enhanced,
            message: text.trim().to_owned(),
            fix: fix.map(str::to_owned),
            after_data: false,
        }
    }
}

/// Finds an RFC 3463 enhanced status code (`x.y.z`) in a reply's text.
pub fn enhanced_code(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == '-' || c == ':' || c == ';' || c == ',')
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "2" | "4" | "5")
                && parts[1..]
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_replies_are_classified_with_their_fix() {
        let e = SendError::from_reply(
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        );
        assert_eq!(e.kind(), FailureKind::Configuration);
        assert_eq!(e.enhanced.as_deref(), Some("5.7.139"));
        assert!(e.to_string().contains("Set-CASMailbox"), "{e}");

        let e = SendError::from_reply(535, "5.7.3 Authentication unsuccessful");
        assert_eq!(e.kind(), FailureKind::Authentication);

        let e = SendError::from_reply(
            554,
            "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        );
        assert!(e.is_permanent());
        assert!(e.fix.unwrap().contains("Send As"));

        assert!(
            SendError::from_reply(
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
            )
            .is_transient()
        );
        assert!(SendError::from_reply(421, "4.4.2 Connection dropped").is_transient());
        assert!(SendError::from_reply(451, "4.3.0 Try again later").is_transient());
        assert!(SendError::from_reply(550, "5.1.1 User unknown").is_permanent());
        assert!(SendError::from_reply(530, "5.7.57 Client not authenticated").pauses_account());
    }
}
