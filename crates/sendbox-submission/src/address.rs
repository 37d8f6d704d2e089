//! Envelope addresses: `MAIL FROM:<..>` / `RCPT TO:<..>` arguments, their
//! syntax, and allow-list patterns.

/// `FROM:<addr> PARAMS` → (`addr`, `PARAMS`); the keyword case-insensitive,
/// a space after the colon tolerated.
pub(crate) fn path_arg<'a>(arg: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((&rest[..end], rest[end + 1..].trim()))
}

/// A mailbox `local@domain`: no spaces, brackets, quotes or control
/// characters, at most 254 bytes, one `@` with both sides non-empty.
pub(crate) fn valid_address(addr: &str) -> bool {
    addr.len() <= 254
        && !addr
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>\"(),;:\\[]".contains(c))
        && addr.rsplit_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !l.contains('@') && (d.contains('.') || d == "localhost")
        })
}

/// `a@b.c` or `*@b.c`, case-insensitively.
pub(crate) fn matches_pattern(addr: &str, pattern: &str) -> bool {
    match pattern.strip_prefix("*@") {
        Some(domain) => addr
            .rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
        None => addr.eq_ignore_ascii_case(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_addresses() {
        assert_eq!(
            path_arg("FROM:<a@b.c> SIZE=10", "FROM:"),
            Some(("a@b.c", "SIZE=10"))
        );
        assert_eq!(path_arg("from: <>", "FROM:"), Some(("", "")));
        assert_eq!(path_arg("TO:a@b.c", "TO:"), None);
        assert!(valid_address("scanner@example.com"));
        assert!(valid_address("root@localhost"));
        assert!(!valid_address("a b@example.com"));
        assert!(!valid_address("a@b@example.com"));
        assert!(!valid_address("@example.com"));
        assert!(!valid_address("@localhost"));
        assert!(!valid_address("user@[10.0.0.1]"));
        assert!(!valid_address("a@example.com\r\nRCPT TO:<x@y.z>"));
        assert!(matches_pattern("Ops@Example.com", "*@example.com"));
        assert!(!matches_pattern("ops@example.com.evil", "*@example.com"));
    }
}
