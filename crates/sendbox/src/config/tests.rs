//! Config loading: errors point at file, line, column and key.

mod unit {
    use crate::config::*;
    use std::path::Path;

    fn errors(src: &str) -> Vec<String> {
        parse(Path::new("sendbox.toml"), src).unwrap_err().errors
    }

    const PLUGIN: &str = "[accounts.a]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"m\"\n\
                          [plugins.p]\nwasm = \"p.wasm\"\naccount = \"a\"\n";

    #[test]
    fn unauthenticated_routes_stay_on_loopback_unless_loudly_allowed() {
        let open = format!("{PLUGIN}[plugins.p.webhook]\npath = \"/h\"\nunauthenticated = true\n");
        let public = format!("[daemon]\nlisten = \"0.0.0.0:8025\"\n{open}");
        let e = errors(&public);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("`plugins.p.webhook.unauthenticated`"),
            "{e:?}"
        );
        assert!(
            e[0].contains("dangerously_allow_unauthenticated_webhooks_on_public_address"),
            "{e:?}"
        );
        for listen in ["127.0.0.1:8025", "[::1]:8025", "localhost:8025"] {
            let local = format!("[daemon]\nlisten = \"{listen}\"\n{open}");
            assert!(parse(Path::new("s.toml"), &local).is_ok(), "{listen}");
        }
        let allowed = public.replace(
            "[daemon]\n",
            "[daemon]\ndangerously_allow_unauthenticated_webhooks_on_public_address = true\n",
        );
        assert!(parse(Path::new("s.toml"), &allowed).is_ok());
    }

    #[test]
    fn a_route_body_larger_than_the_held_bodies_budget_is_refused_with_the_fix() {
        let route = format!(
            "[daemon]\nwebhook_max_held_body_bytes = 1000000\n{PLUGIN}[plugins.p.webhook]\npath = \"/h\"\nunauthenticated = true\n"
        );
        // The route's default 1 MiB is over 1,000,000 bytes.
        let e = errors(&route);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sendbox.toml:")
                && e[0].contains("`plugins.p.webhook.max_body_bytes`")
                && e[0].contains(
                    "1048576 bytes is more than `[daemon] webhook_max_held_body_bytes` (1000000)"
                )
                && e[0].contains("lower it, or raise that"),
            "{e:?}"
        );
        let fits = route.replace(
            "path = \"/h\"\n",
            "path = \"/h\"\nmax_body_bytes = 1000000\n",
        );
        let c = parse(Path::new("s.toml"), &fits).unwrap();
        assert_eq!(c.webhook_limits.max_held_body_bytes, 1_000_000);
        // Unset, the budget is 64 MiB.
        let plain = parse(Path::new("s.toml"), PLUGIN).unwrap();
        assert_eq!(plain.webhook_limits.max_held_body_bytes, 64 << 20);
    }

    const ACCOUNT: &str = "[accounts.a]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"m\"\n";

    #[test]
    fn a_plugin_in_the_config_file_names_its_component() {
        let e = errors(&format!("{ACCOUNT}[plugins.p]\naccount = \"a\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("sendbox.toml:5:1: `plugins.p.wasm`: missing: name the plugin's component, e.g. `wasm = \"plugins/p.wasm\"`"),
            "{e:?}"
        );
    }

    #[test]
    fn a_drop_in_is_checked_in_its_own_file_and_its_paths_are_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("plugins.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hook.toml"),
            "account = \"a\"\n[[watch]]\nname = \"in\"\ndir = \"incoming\"\n[[schedule]]\nname = \"s\"\ncron = \"not a cron\"\n",
        )
        .unwrap();
        let main = dir.path().join("sendbox.toml");
        let src = format!("[daemon]\nplugins_dir = \"plugins.d\"\n{ACCOUNT}");
        let e = parse(&main, &src).unwrap_err().errors;
        assert_eq!(e.len(), 1, "{e:?}");
        let at = format!("{}:7:", d.join("hook.toml").display());
        assert!(e[0].starts_with(&at) && e[0].contains("cron"), "{e:?}");

        std::fs::write(
            d.join("hook.toml"),
            "account = \"a\"\n[[watch]]\nname = \"in\"\ndir = \"incoming\"\n",
        )
        .unwrap();
        let cfg = parse(&main, &src).unwrap();
        // Another folder is picked up by a reload, not left for a restart.
        let elsewhere = parse(&main, &src.replace("plugins.d", "other.d")).unwrap();
        assert_eq!(cfg.restart_fingerprint, elsewhere.restart_fingerprint);
        let p = &cfg.plugins["hook"];
        assert_eq!(p.wasm, d.join("hook.wasm"));
        assert_eq!(p.defined_in, d.join("hook.toml"));
        assert_eq!(p.watches[0].dir, d.join("incoming"));
        assert_eq!(cfg.plugins_dir.as_deref(), Some(d.as_path()));
    }

    #[test]
    fn listeners_that_would_relay_for_anyone_or_leak_passwords_are_refused() {
        let listener = |body: &str| format!("{ACCOUNT}[listeners.office]\naccount = \"a\"\n{body}");
        // Nobody may submit.
        let e = errors(&listener("listen = \"127.0.0.1:2525\"\n"));
        assert!(
            e[0].starts_with("sendbox.toml:7:")
                && e[0].contains("`listeners.office.users_file`: nobody may submit"),
            "{e:?}"
        );
        // Every address.
        let e = errors(&listener(
            "listen = \"127.0.0.1:2525\"\nallow_networks = [\"0.0.0.0/0\"]\n",
        ));
        assert!(
            e[0].contains("`listeners.office.allow_networks`: 0.0.0.0/0 is every address"),
            "{e:?}"
        );
        let e = errors(&listener(
            "listen = \"127.0.0.1:2525\"\nallow_networks = [\"office\"]\n",
        ));
        assert!(e[0].contains("\"office\" is not a network"), "{e:?}");
        // Logins in clear text over the network.
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        let hash = sendbox_submission::PasswordHash::create("pw").unwrap();
        std::fs::write(&users, format!("scanner:{hash}\n")).unwrap();
        let with_users = format!("users_file = \"{}\"\n", users.display());
        let e = errors(&listener(&format!(
            "listen = \"0.0.0.0:587\"\n{with_users}"
        )));
        assert!(
            e[0].contains("`listeners.office.tls`: logins would cross the network in clear text"),
            "{e:?}"
        );
        assert!(
            parse(
                Path::new("s.toml"),
                &listener(&format!("listen = \"127.0.0.1:2525\"\n{with_users}"))
            )
            .is_ok()
        );
        // TLS files that are not there are named.
        let e = errors(&listener(&format!(
            "listen = \"0.0.0.0:587\"\n{with_users}tls = \"starttls\"\ncertificate = \"/nonexistent/cert.pem\"\nprivate_key = \"/nonexistent/key.pem\"\n"
        )));
        assert!(
            e[0].contains(
                "`listeners.office.certificate`: /nonexistent/cert.pem: cannot read the certificate"
            ),
            "{e:?}"
        );
        let e = errors(&listener(
            "listen = \"127.0.0.1:2525\"\nallow_networks = [\"10.0.0.0/8\"]\ntls = \"ssl\"\n",
        ));
        assert!(e[0].contains("\"ssl\" is not a TLS mode"), "{e:?}");
        // A bad users file names its line; an unknown account is named.
        std::fs::write(&users, "scanner:plaintext\n").unwrap();
        let e = errors(&listener(&format!(
            "listen = \"127.0.0.1:2525\"\n{with_users}"
        )));
        assert!(
            e[0].contains("line 1:") && e[0].contains("sendbox hash-password"),
            "{e:?}"
        );
        let e = errors(
            &listener("listen = \"127.0.0.1:2525\"\nallow_networks = [\"10.0.0.0/8\"]\n")
                .replace("account = \"a\"", "account = \"nope\""),
        );
        assert!(e[0].contains("no account named \"nope\""), "{e:?}");
        let e = errors(&listener(
            "listen = \"mail:25\"\nallow_networks = [\"10.0.0.0/8\"]\n",
        ));
        assert!(e[0].contains("`listeners.office.listen`"), "{e:?}");
    }

    #[test]
    fn signature_schemes_are_checked() {
        // SAFETY: tests in this module set only their own variable.
        unsafe { std::env::set_var("SENDBOX_CONFIG_TEST_WHSEC", "whsec_c2VjcmV0IGtleQ==") };
        let route = |extra: &str| {
            format!(
                "{PLUGIN}[plugins.p.webhook]\npath = \"/h\"\nsecret = {{ env = \"SENDBOX_CONFIG_TEST_WHSEC\" }}\n{extra}"
            )
        };
        let c = parse(
            Path::new("s.toml"),
            &route("scheme = \"standard-webhooks\"\ntolerance_secs = 60\n"),
        )
        .unwrap();
        let w = c.plugins["p"].webhook.as_ref().unwrap();
        assert_eq!(
            w.auth,
            sendbox_triggers::webhook::Auth::StandardWebhooks {
                secret: b"secret key".to_vec()
            }
        );
        assert_eq!(w.replay.tolerance, std::time::Duration::from_secs(60));
        let e = errors(&route("scheme = \"hmac-md5\"\n"));
        assert!(e[0].contains("`plugins.p.webhook.scheme`"), "{e:?}");
        let e = errors(&route("scheme = \"stripe\"\ndedupe_header = \"X-Id\"\n"));
        assert!(e[0].contains("belong to the `github` scheme"), "{e:?}");
        let c = parse(
            Path::new("s.toml"),
            &route("dedupe_header = \"X-GitHub-Delivery\"\n"),
        )
        .unwrap();
        let w = c.plugins["p"].webhook.as_ref().unwrap();
        assert_eq!(w.replay.dedupe_header.as_deref(), Some("x-github-delivery"));
    }

    #[test]
    fn unknown_keys_name_file_line_and_column() {
        let e = errors(
            "[accounts.a]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"m\"\ncolour = 1\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("sendbox.toml:"), "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
    }

    #[test]
    fn inline_secrets_are_refused_with_the_fix() {
        let e = errors(
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@b.c\"\ntenant = \"t\"\nclient_id = \"id\"\nclient_secret = \"hunter2\"\n",
        );
        assert!(
            e[0].starts_with("sendbox.toml:6:17: `accounts.m.client_secret`"),
            "{e:?}"
        );
        assert!(e[0].contains("{ file ="), "{e:?}");
        assert!(!e[0].contains("hunter2"));
    }

    #[test]
    fn inline_secret_opt_in_is_warned_about() {
        let c = parse(
            Path::new("s.toml"),
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@b.c\"\ntenant = \"t\"\nclient_id = \"id\"\nclient_secret = \"hunter2\"\nallow_inline_secret = true\n",
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(!c.warnings[0].contains("hunter2"));
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug hides the secret"
        );
    }

    #[test]
    fn trigger_errors_point_at_the_key() {
        let e = errors(concat!(
            "[accounts.local]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"mail\"\n",
            "[plugins.p]\nwasm = \"p.wasm\"\naccount = \"local\"\n",
            "[plugins.p.webhook]\npath = \"hooks\"\nunauthenticated = true\n",
            "[[plugins.p.watch]]\nname = \"in\"\ndir = \"in\"\nexclude = [\"[\"]\n",
            "[[plugins.p.schedule]]\nname = \"s\"\ncron = \"0 8 * *\"\n",
            "[[plugins.p.schedule]]\nname = \"t\"\ncron = \"0 8 * * *\"\ntimezone = \"Mars/Base\"\ncatch_up = \"always\"\n",
        ));
        let has = |at: &str, key: &str| e.iter().any(|l| l.starts_with(at) && l.contains(key));
        assert!(
            has("sendbox.toml:9:8:", "`plugins.p.webhook.path`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:14:11:", "`plugins.p.watch[0].exclude`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:17:8:", "`plugins.p.schedule[0].cron`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:21:12:", "`plugins.p.schedule[1].timezone`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:22:12:", "`plugins.p.schedule[1].catch_up`"),
            "{e:?}"
        );
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let e = errors(
            "[accounts.a]\nprovider = \"nope\"\nmailbox = \"x\"\nclient_id = \"i\"\nclient_secret = { env = \"SENDBOX_UNSET_FOR_TEST\" }\n\n[plugins.p]\nwasm = \"p.wasm\"\naccount = \"missing\"\n",
        );
        assert!(
            e.iter().any(|l| l.contains("`accounts.a.mailbox`")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("`plugins.p.account`: no account named \"missing\"")),
            "{e:?}"
        );
    }

    #[test]
    fn microsoft365_preset_fills_endpoints_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "x\n").unwrap();
        let cfg = format!(
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@contoso.com\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"id\"\nclient_secret = {{ file = \"{}\" }}\n",
            dir.path().join("s").display()
        );
        let c = parse(Path::new("s.toml"), &cfg).unwrap();
        let AccountKind::Smtp(s) = &c.accounts["m"].kind else {
            panic!()
        };
        assert_eq!(s.smtp.host, "smtp.office365.com");
        assert_eq!(s.smtp.port, 587);
        assert_eq!(s.smtp.max_connections, 3);
        assert_eq!(
            s.endpoints.scopes,
            ["https://outlook.office365.com/.default"]
        );
        assert!(
            s.endpoints
                .token_url
                .contains("/contoso.onmicrosoft.com/oauth2/v2.0/token")
        );
    }
}

#[cfg(test)]
mod example_files {
    use crate::config::*;
    use sendbox_auth::Credentials;
    use std::path::{Path, PathBuf};

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name)
    }

    #[test]
    fn every_example_config_loads() {
        // SAFETY: set once, before anything reads them, in this test binary.
        unsafe {
            std::env::set_var("M365_CLIENT_SECRET", "example-secret");
            std::env::set_var("GOOGLE_CLIENT_SECRET", "example-secret");
            std::env::set_var("SENDBOX_PG_PASSWORD", "example-pg-password");
        }
        let node = load(&example("cluster-node.toml")).unwrap();
        let pg = node.postgres.as_ref().expect("a postgres:// store");
        assert_eq!(
            pg.url,
            "postgres://sendbox@db.internal:5432/sendbox?sslmode=verify-full"
        );
        assert_eq!(pg.node, "mail-1");
        assert_eq!((pg.pool, pg.lease.as_secs()), (8, 60));
        assert_eq!(
            pg.password.as_ref().map(sendbox_auth::Secret::expose),
            Some("example-pg-password")
        );
        assert!(
            !format!("{node:?}").contains("example-pg-password"),
            "the password never shows in Debug"
        );
        let m365 = load(&example("microsoft365-app-only.toml")).unwrap();
        let AccountKind::Smtp(a) = &m365.accounts["alerts"].kind else {
            panic!()
        };
        assert_eq!(a.smtp.host, "smtp.office365.com");
        assert!(matches!(a.credentials, Credentials::ClientSecret(_)));

        let delegated = load(&example("microsoft365-delegated.toml")).unwrap();
        let AccountKind::Smtp(a) = &delegated.accounts["alerts"].kind else {
            panic!()
        };
        assert_eq!(
            a.endpoints.scopes,
            ["https://outlook.office.com/SMTP.Send", "offline_access"]
        );
        assert!(
            a.endpoints
                .device_url
                .as_deref()
                .unwrap()
                .ends_with("/devicecode")
        );

        let quick = load(&example("quickstart.toml")).unwrap();
        for name in ["file-alert", "webhook-bridge", "daily-digest"] {
            assert!(quick.plugins.contains_key(name), "{name}");
        }
        assert!(quick.plugins_dir.is_some());
        assert!(matches!(
            quick.accounts["local"].kind,
            AccountKind::File { .. }
        ));
        assert_eq!(quick.plugins["file-alert"].watches.len(), 1);
        assert_eq!(quick.plugins["daily-digest"].schedules.len(), 1);
        assert_eq!(
            quick.plugins["webhook-bridge"].webhook_path.as_deref(),
            Some("/hooks/alerts")
        );
        let local = &quick.listeners["local"];
        assert_eq!(local.listen.to_string(), "127.0.0.1:2525");
        assert!(local.settings.users.is_none());
        assert_eq!(local.settings.allow_networks.len(), 2);

        let gmail = load(&example("gmail.toml")).unwrap();
        let AccountKind::Smtp(a) = &gmail.accounts["gmail"].kind else {
            panic!()
        };
        assert_eq!(a.smtp.host, "smtp.gmail.com");
        assert_eq!(a.endpoints.scopes, ["https://mail.google.com/"]);
        assert!(matches!(
            a.credentials,
            Credentials::RefreshToken {
                client_secret: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_postgres_store_refuses_a_password_in_its_url_and_names_the_fix() {
        let errs = parse(
            Path::new("/etc/sendbox/sendbox.toml"),
            "[daemon]\nstore = \"postgres://sendbox:hunter2@db:5432/sendbox\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            errs.contains("`daemon.store`: the URL holds a password"),
            "{errs}"
        );
        assert!(
            errs.contains("[daemon.postgres] password = { env"),
            "{errs}"
        );
        assert!(!errs.contains("hunter2"), "{errs}");
    }

    #[test]
    fn a_postgres_store_names_a_tls_setting_it_cannot_honour() {
        for (query, expected) in [
            ("sslmode=allow", "sslmode=allow is not one sendbox knows"),
            ("sslrootcert=/etc/ca.pem", "add sslmode=verify-full"),
            (
                "sslmode=verify-full&sslrootcert=ca.pem",
                "must be an absolute path",
            ),
            (
                "sslmode=verify-full&sslrootcert=/nonexistent/db-ca.pem",
                "sslrootcert /nonexistent/db-ca.pem: cannot read it",
            ),
        ] {
            let errs = parse(
                Path::new("/etc/sendbox/sendbox.toml"),
                &format!("[daemon]\nstore = \"postgres://sendbox@db:5432/sendbox?{query}\"\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(errs.contains("`daemon.store`"), "{query}: {errs}");
            assert!(errs.contains(expected), "{query}: {errs}");
        }
    }

    #[test]
    fn a_postgres_table_without_a_postgres_store_is_refused_with_its_line() {
        let errs = parse(
            Path::new("/etc/sendbox/sendbox.toml"),
            "[daemon]\nstore = \"var/sendbox.db\"\n\n[daemon.postgres]\nnode = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            (errs.contains("/etc/sendbox/sendbox.toml:4:")
                || errs.contains("/etc/sendbox/sendbox.toml:5:"))
                && errs.contains("`daemon.postgres`: is only for a `postgres://` store"),
            "{errs}"
        );
    }

    #[test]
    fn a_postgres_node_defaults_to_the_host_name() {
        let cfg = parse(
            Path::new("/etc/sendbox/sendbox.toml"),
            "[daemon]\nstore = \"postgresql://sendbox@db/sendbox\"\n",
        )
        .unwrap();
        let pg = cfg.postgres.unwrap();
        assert!(!pg.node.is_empty());
        assert_eq!((pg.pool, pg.lease.as_secs()), (8, 60));
        assert!(pg.password.is_none());
    }
}
