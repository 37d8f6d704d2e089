//! A database of its own per test, on the PostgreSQL server the tests use:
//! `DATABASE_URL` (a `postgres://` URL), else
//! `postgres://postgres@localhost:5432/postgres`. `./scripts/test.sh`
//! starts a throwaway server when none is running. No server: the test
//! fails, loudly, saying so.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server's URL.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".into())
}

/// `url` pointing at database `db` instead.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("DATABASE_URL is a postgres:// URL");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{scheme}://{authority}/{db}{query}")
}

async fn admin() -> tokio_postgres::Client {
    let url = server_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no PostgreSQL server at {url} ({e}): start one, or run ./scripts/test.sh, which does"
            )
        });
    tokio::spawn(conn);
    client
}

/// A fresh, empty database; dropped (with any connection left) when this
/// is dropped.
pub struct Database {
    /// Its URL.
    pub url: String,
    name: String,
}

impl Database {
    /// Creates it.
    pub async fn create() -> Database {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sendbox_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Database {
            url: with_database(&server_url(), &name),
            name,
        }
    }

    /// Runs `sql` on it and returns the first column of each row as text.
    pub async fn query(&self, sql: &str) -> Vec<String> {
        query(&self.url, sql).await
    }
}

/// Runs `sql` on the database at `url` and returns the first column of
/// each row as text.
pub async fn query(url: &str, sql: &str) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropped inside a test's runtime: a thread with its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let _ = admin()
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                })
        })
        .join();
    }
}

/// A PostgreSQL server of a test's own (Debian's binaries, a cluster in a
/// temporary folder, a free port), which the test may stop and start: for
/// what happens when the database goes away. Removed when dropped.
pub struct Throwaway {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    port: u16,
    as_postgres: bool,
    /// Server options beyond the port and address (TLS).
    extra: String,
}

impl Throwaway {
    /// Creates and starts it; fails loudly without Debian's `postgresql`.
    pub fn start() -> Throwaway {
        Self::start_with(false)
    }

    /// [`Throwaway::start`], with TLS on: its certificate (for `localhost`
    /// and 127.0.0.1) is signed by a CA of its own, [`Throwaway::ca_file`];
    /// [`Throwaway::other_ca_file`] is a CA that signed nothing of it.
    /// Plain connections are still accepted.
    pub fn start_with_tls() -> Throwaway {
        Self::start_with(true)
    }

    /// The CA that signed the server's certificate (after
    /// [`Throwaway::start_with_tls`]).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// A CA unrelated to the server.
    pub fn other_ca_file(&self) -> std::path::PathBuf {
        self.dir.join("tls/other-ca.pem")
    }

    fn start_with(tls: bool) -> Throwaway {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("Debian's postgresql is installed (scripts/test.sh installs it)");
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sendbox-test-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let extra = if tls {
            make_certificates(&dir.join("tls"))
        } else {
            String::new()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // PostgreSQL refuses to run as root: as root, the cluster is the
        // `postgres` user's (the Debian package creates it).
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success(), "chown the cluster's folder to postgres");
        }
        let me = Throwaway {
            dir,
            bin,
            port,
            as_postgres,
            extra,
        };
        let data = me.dir.join("data");
        me.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        me.up();
        me
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let mut all = vec![
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
        ];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    /// Starts the server (again).
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1{}",
            self.port,
            self.dir.display(),
            self.extra
        );
        self.pg_ctl(&["-o", &opts, "start"]);
    }

    /// Stops the server (fast: open connections are cut).
    pub fn down(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, a server certificate it signed for `localhost` and 127.0.0.1, and
/// an unrelated CA, made with `openssl` in `dir`; the server options that
/// use them.
fn make_certificates(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (the test peers need it too)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN=sendbox test {ca}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-days", "2", "-subj", &subj, "-keyout", &key, "-out", &pem]);
        openssl(&args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&args);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    // PostgreSQL refuses a key others may read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    format!(
        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    )
}
