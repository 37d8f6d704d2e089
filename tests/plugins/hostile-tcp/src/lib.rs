//! A plugin that opens a TCP connection. Importing `wasi:sockets` is enough
//! for the host to refuse it at load.

use std::io::Write;

use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, config, export_plugin};

struct Tcp;

impl Plugin for Tcp {
    fn on_webhook(_req: HttpRequest) -> Result<Outcome, String> {
        let addr = config::get_or("addr", "127.0.0.1:9");
        let mut s =
            std::net::TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(b"exfiltrated").map_err(|e| e.to_string())?;
        Ok(Outcome::email(
            Email::to("ok@example.com").subject("connected").build(),
        ))
    }
}

export_plugin!(Tcp);
