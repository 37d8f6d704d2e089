//! Errors from token providers, with a sentence saying what to fix.

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The account's settings are unusable (missing file, bad key...).
    #[error("{message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The token endpoint refused the request.
    #[error("token endpoint refused the request: {code}{}: {fix}", description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The OAuth2 error code, e.g. `invalid_client`.
        code: String,
        /// The server's description, e.g. an `AADSTS...` message.
        description: Option<String>,
        /// What the operator should do.
        fix: String,
    },
    /// The token endpoint could not be reached or answered nonsense. Worth
    /// retrying later.
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The account needs an interactive login first.
    #[error("{0}")]
    LoginRequired(String),
}

impl AuthError {
    /// Whether trying again later may succeed (network trouble, a 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(self, AuthError::Unavailable(_))
    }
}

/// A plain sentence for an OAuth2 error code and description, covering the
/// Microsoft Entra `AADSTS` codes operators meet most.
pub fn explain(code: &str, description: Option<&str>) -> String {
    let d = description.unwrap_or_default();
    let aad = [
        (
            "AADSTS7000215",
            "the client secret is wrong: copy the secret's *Value* (not its ID) from the app registration's Certificates & secrets page",
        ),
        (
            "AADSTS7000222",
            "the client secret has expired: create a new one in the app registration and update the secret file",
        ),
        (
            "AADSTS700016",
            "no application with this client id exists in the tenant: check `client_id` and `tenant`",
        ),
        (
            "AADSTS90002",
            "the tenant was not found: check `tenant` (a domain like contoso.onmicrosoft.com or the directory id)",
        ),
        (
            "AADSTS700027",
            "the client assertion signature did not verify: upload this certificate to the app registration, or point `certificate_file` at the one uploaded",
        ),
        (
            "AADSTS700082",
            "the refresh token expired from inactivity: run `sendbox login` for this account again",
        ),
        (
            "AADSTS70008",
            "the refresh token has expired or was revoked: run `sendbox login` for this account again",
        ),
        (
            "AADSTS50173",
            "the grant was revoked (password change or admin action): run `sendbox login` for this account again",
        ),
        (
            "AADSTS65001",
            "the app has no consent for the requested permission: grant admin consent in the app registration's API permissions",
        ),
        (
            "AADSTS7000218",
            "the request needs a client secret or certificate: configure `client_secret` or `private_key_file`",
        ),
        (
            "AADSTS70011",
            "the scope is invalid for this grant: app-only uses https://outlook.office365.com/.default, delegated uses https://outlook.office.com/SMTP.Send offline_access",
        ),
    ];
    if let Some((_, fix)) = aad.iter().find(|(c, _)| d.contains(c)) {
        return (*fix).to_owned();
    }
    match code {
        "invalid_client" => "the client id or client secret/certificate was not accepted: check them against the provider's app registration".into(),
        "invalid_grant" => "the grant (refresh token or device code) is no longer valid: run `sendbox login` for this account again".into(),
        "unauthorized_client" => "this client is not allowed to use this grant type: enable it in the app registration".into(),
        "invalid_scope" => "the provider does not accept the requested scope: check `scopes` (or the preset) for this account".into(),
        "access_denied" => "the login was declined".into(),
        "expired_token" => "the device code expired before the login finished: run `sendbox login` again and complete it sooner".into(),
        _ => "see the provider's description".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_codes_win_over_the_generic_code() {
        let s = explain(
            "invalid_client",
            Some("AADSTS7000215: Invalid client secret provided."),
        );
        assert!(s.contains("client secret is wrong"), "{s}");
        assert!(explain("invalid_grant", None).contains("sendbox login"));
    }
}
